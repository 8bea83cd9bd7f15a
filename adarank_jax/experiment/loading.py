"""Checkpoints -> a `Setup`: what a run needs of the models, one small record per run.

  setup = loading.load_clip(model=..., pretrained=..., finetuned=[...], tasks=[...], ...)
  setup.merged            # the tree AdaRank merges (the CLIP image tower; the LM minus its heads)
  setup.finetuned         # T trees of the same structure
  setup.logits(params, t, batch) -> (B, classes)   # pure, jittable; t (static) picks task t's head:
                          # a zero-shot CLIP head, or fine-tuned LM t's own classifier and config
  setup.train_logits(layout)(params, batches) -> T logits  # the same for every task at once
                          # (a train.LogitsFn per layout.Layout): CLIP runs its image tower, traced
                          # once, over all tasks' images, `layout.tasks_per_forward` tasks per call
  setup.predict(params, t, batch)                  # the same, jitted, for evaluation
  setup.export(params, path)                       # a merged tree -> PyTorch-loadable checkpoint(s)
  setup.objective(logits_t, inputs_t) -> H_t       # what adaptation minimises (train.Objective)

The variant is data: experiment/run.py never branches on the architecture beyond picking the loader (load_clip for
CLIP, load_lm for the language classifiers, load_causal_lm for generative merging).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adarank_jax.core import layout as layout_lib
from adarank_jax.core import lora, train, tree_util
from adarank_jax.data import clip_tokenizer, registry
from adarank_jax.models import clip, decoder, functional
from adarank_jax.models import heads as heads_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """The loaded models: the trees to merge, the heads and the pure functions over them."""

  modality: str  # 'vision' | 'text' | 'prompts' (generative): which input pipeline feeds it
  merged: Any  # pretrained tree of the merged part
  finetuned: tuple[Any, ...]  # T fine-tuned trees of the same structure
  logits: Callable[[Any, int, Any], jax.Array]
  train_logits: Callable[[layout_lib.Layout], train.LogitsFn]  # `logits` of every task at once, for
  # the training step laid out as the layout says
  tower_layouts: bool  # whether the layout's tasks_per_forward and remat change train_logits' program
  predict: Callable[[Any, int, Any], jax.Array]  # jitted `logits` for evaluation, compiled sparingly
  export: Callable[[Any, str | os.PathLike], None]
  image_size: int = 0  # vision: the model's input resolution
  tokenizer: str = ""  # text, prompts: local tokenizer directory
  objective: train.Objective = train.class_entropy  # H_t of task t's logits and inputs


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_clip(
  *,
  model: str,
  pretrained: str,
  finetuned: Sequence[str],
  tasks: Sequence[str],
  dtype: str,
  run_pickled_code: bool,
  cache_dir: str | os.PathLike,
) -> Setup:
  """OpenCLIP checkpoints -> image towers + zero-shot heads built with the Flax text tower.

  Args:
    model: OpenCLIP model-config name ('ViT-B-32') or JSON path.
    pretrained: a full CLIP checkpoint (its text tower builds the heads).
    finetuned: one checkpoint per task (full CLIP or image tower alone; only the tower is used).
    tasks: registry task names, in the order of `finetuned`.
    dtype: compute dtype name.
    run_pickled_code: allow checkpoints that pickle whole modules.
    cache_dir: where zero-shot heads are cached.
  """
  # pylint: disable-next=g-import-not-at-top (needs torch for .pt)
  from adarank_jax.interop import openclip, openclip_config

  config = openclip_config.load_config(model)  # parsed once, passed to every checkpoint's loader
  loaded, problems = [], []
  for path, text in ((pretrained, True), *((path, False) for path in finetuned)):
    try:  # every bad checkpoint is listed, not only the first
      loaded.append(openclip.load_openclip(path, config, text=text, run_pickled_code=run_pickled_code))
    except (ValueError, OSError) as error:
      problems.append(str(error))
  if problems:
    raise ValueError(
      f"{len(problems)} of {1 + len(finetuned)} checkpoints cannot be used:\n  " + "\n  ".join(problems)
    )
  full, *tuned = loaded
  tuned = tuple(tuned)
  heads = zero_shot_heads(config, full, tasks, cache_dir=cache_dir, source=f"model config {model}")
  graphdef, _ = functional.split(
    nnx.eval_shape(lambda: clip.build(config.vision, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))
  )

  def apply(params, head, images):
    return heads_lib.classify(functional.call(graphdef, params, images), head)

  def logits(params, t, batch):
    return apply(params, heads[t], batch["image"])

  # The head is an argument, not a constant: one compile per head shape serves every task.
  jitted = jax.jit(apply)

  def train_logits(layout: layout_lib.Layout) -> train.LogitsFn:
    # The tower traced once, called on `tasks_per_forward` tasks' images at a time, then each task's
    # head on its own rows.
    return train.one_forward(
      lambda params, batch: functional.call(graphdef, params, batch["image"]),
      lambda t, features: heads_lib.classify(features, heads[t]),
      tasks_per_call=layout.tasks_per_forward or None,
      remat=layout.remat,
    )

  def predict(params, t, batch):
    return jitted(params, heads[t], batch["image"])

  def export(params, path):
    openclip.export_openclip({**full, "visual": jax.device_get(params)}, path)

  return Setup(
    modality="vision",
    merged=full["visual"],
    finetuned=tuned,
    logits=logits,
    train_logits=train_logits,
    tower_layouts=True,
    predict=predict,
    export=export,
    image_size=config.vision.image_size,
  )


def zero_shot_heads(
  config: clip.CLIPConfig, full: Any, tasks: Sequence[str], *, cache_dir: str | os.PathLike, source: str = ""
) -> tuple[np.ndarray, ...]:
  """Each task's (classes, dim) head from its class names and templates, cached per model and task.

  Every task's token ids are checked against the text tower's vocabulary before any head is built (an
  error names `source`, the model config, and the max id vs vocab_size); a non-finite head is an error
  and is never cached.
  """
  tokenize = clip_tokenizer.Tokenizer(context_length=config.text.context_length)
  source = source or f"model config {config}"
  for name in tasks:  # all at once, before any compute: ids beyond the vocabulary would give NaN heads
    task = registry.get(name)
    heads_lib.check_token_ids(
      tokenize([template.format(c) for c in task.classnames for template in task.templates]),
      config.text.vocab_size,
      source=f"{source} (task {name})",
    )
  graphdef, _ = functional.split(nnx.eval_shape(lambda: clip.build(config, rngs=nnx.Rngs(0))))
  encode_text = jax.jit(functools.partial(functional.call, graphdef, method="encode_text"))
  fingerprint = heads_lib.fingerprint({"text": full["text"], "logit_scale": full["logit_scale"]})[:16]
  out = []
  for name in tasks:
    task = registry.get(name)
    out.append(
      heads_lib.cached_zero_shot_head(
        cache_dir=Path(cache_dir),
        key=f"{fingerprint}_{name}",
        encode_text_fn=lambda tokens: encode_text(full, jnp.asarray(tokens)),
        tokenize_fn=tokenize,
        classnames=task.classnames,
        templates=task.templates,
        logit_scale=float(np.asarray(full["logit_scale"])),
        vocab_size=config.text.vocab_size,
        source=f"{source} (task {name})",
      )
    )
  return tuple(out)


# The files of a Hugging Face tokenizer, copied from the pretrained directory into LM exports.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.txt",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
)

# The classification heads the official LM code swaps in per task: architecture -> (body key, head
# key). The body is merged; each task keeps its own fine-tuned head.
LM_HEADS = {
  "RobertaForSequenceClassification": ("roberta", "classifier"),
  "BertForSequenceClassification": ("bert", "classifier"),
  "GPT2ForSequenceClassification": ("transformer", "score"),
  **{f"{prefix}ForSequenceClassification": ("model", "score") for prefix in decoder.MODEL_TYPES.values()},
}


def load_lm(*, pretrained: str, finetuned: Sequence[str], tasks: Sequence[str], dtype: str) -> Setup:
  """HF RoBERTa/BERT/GPT-2/Llama/Mistral/Qwen2 directories -> merged body + each fine-tuned model's own
  head and config.

  The fine-tuned models are sequence classifiers of one architecture (heads may differ in size);
  the pretrained one is the same classifier architecture or its bare body or causal LM (RobertaModel,
  BertModel, GPT2Model, GPT2LMHeadModel, LlamaModel, LlamaForCausalLM, ...). `logits(params, t, batch)`
  runs the body `params` with fine-tuned model t's head and config (e.g. the pad id, which picks the
  pooled token of GPT-2 and the decoders), as the official code swaps heads in. So the 'zero_shot'
  method of an LM is the pretrained body with each task's fine-tuned head. `export(params, path)` writes
  path/<task>/ per task: an HF directory (config.json + safetensors, sharded for the decoders) of the body
  with that task's head and config.

  A decoder directory (`interop.safetensors_dir`) is checked from its headers (shards, keys, shapes,
  dtypes) before any tensor is read, then read one tensor at a time with a NaN/Inf check.

  Args:
    pretrained: HF directory of the pretrained model (also the default tokenizer directory).
    finetuned: one HF directory per task.
    tasks: registry task names, in the order of `finetuned` (names the export directories).
    dtype: compute dtype name.
  """
  from adarank_jax.interop import hf, safetensors_dir  # pylint: disable=g-import-not-at-top
  from adarank_jax.models import gpt2, roberta  # pylint: disable=g-import-not-at-top

  if len(tasks) != len(finetuned):
    raise ValueError(f"load_lm: {len(tasks)} tasks but {len(finetuned)} fine-tuned directories")
  read = lambda path: (safetensors_dir.load if safetensors_dir.is_decoder_dir(path) else hf.load_hf)(path)
  pre_config, pre_tree = read(pretrained)
  configs, tuned = [], []
  for path in finetuned:
    config, tree = read(path)
    hf.check_compatible(pre_config, config, reference_source=pretrained, source=path)
    if config.architecture not in LM_HEADS:
      raise ValueError(
        f"{path}: a {config.architecture}; fine-tuned models must be one of {', '.join(LM_HEADS)}"
      )
    if isinstance(config, gpt2.GPT2Config | decoder.DecoderConfig) and config.pad_token_id is None:
      raise ValueError(
        f"{Path(path) / 'config.json'}: pad_token_id is not set; {config.architecture} "
        "pools the last token that is not padding, so it needs the id the inputs are padded with "
        "(GPT-2's eos id, 50256, for its own tokenizer; a decoder's pad or eos id)"
      )
    configs.append(config)
    tuned.append(tree)
  body_key, head_key = LM_HEADS[configs[0].architecture]
  body_shapes = tree_util.shapes(tree_util.flatten(tuned[0][body_key]))
  pre_body = tree_util.flatten(pre_tree[body_key] if body_key in pre_tree else pre_tree)
  pre_body = {k: v for k, v in pre_body.items() if k in body_shapes}  # e.g. a bare body's pooler
  tree_util.check_structure(
    body_shapes, pre_body, source=f"{pretrained} (the {body_key} body of {finetuned[0]})"
  )
  heads = [tree[head_key] for tree in tuned]
  builder = {gpt2.GPT2Config: gpt2.build, decoder.DecoderConfig: decoder.build}.get(
    type(pre_config), roberta.build
  )
  # the families whose classifiers take one segment (no token_type_ids), by the name errors give them
  family = {gpt2.GPT2Config: "GPT-2", decoder.DecoderConfig: "decoder"}.get(type(pre_config))

  logits = lm_logits(
    builder, [dataclasses.replace(c, dtype=dtype) for c in configs], heads, head_key=head_key, family=family
  )

  def export(params, path):
    params = jax.device_get(params)
    for t, (task, config_path) in enumerate(zip(tasks, finetuned)):
      hf_config = json.loads((Path(config_path) / "config.json").read_text())
      save = safetensors_dir.save_sharded if isinstance(pre_config, decoder.DecoderConfig) else hf.save_hf
      save({**params, head_key: heads[t]}, hf_config, Path(path) / task)
      for name in TOKENIZER_FILES:  # so the export is usable as it is, tokenizer included
        if (Path(pretrained) / name).is_file():
          shutil.copyfile(Path(pretrained) / name, Path(path) / task / name)

  return Setup(
    modality="text",
    merged={body_key: tree_util.unflatten(pre_body)},
    finetuned=tuple({body_key: tree[body_key]} for tree in tuned),
    logits=logits,
    train_logits=lambda layout: train.per_task(logits),
    tower_layouts=False,
    predict=jax.jit(logits, static_argnums=1),
    export=export,
    tokenizer=str(pretrained),
  )


def lm_logits(
  builder: Callable[..., nnx.Module],
  configs: Sequence[Any],
  heads: Sequence[Any],
  *,
  head_key: str,
  family: str | None,
) -> Callable[[Any, int, Any], jax.Array]:
  """`logits(params, t, batch)` of LM classifiers: the body `params` with task t's head (its
  `head_key` subtree) and config (`builder(configs[t])`'s module). `family` ('GPT-2', 'decoder'):
  the classifiers take one segment, so a batch with token_type_ids is refused naming it."""
  built = {}  # one graph per distinct config (tasks with heads of one size share it)
  for c in configs:
    if c not in built:
      built[c] = functional.split(nnx.eval_shape(lambda c=c: builder(c, rngs=nnx.Rngs(0))))[0]
  graphdefs = [built[c] for c in configs]

  def logits(params, t, batch):
    if family and "token_type_ids" in batch:
      raise ValueError(
        f"the tokenizer gives token_type_ids, which {family} classifiers here do not take; use a "
        "tokenizer whose inputs are input_ids and attention_mask (GPT2TokenizerFast, a decoder's own)"
      )
    return functional.call(graphdefs[t], {**params, head_key: heads[t]}, **batch)

  return logits


def load_causal_lm(*, pretrained: str, finetuned: Sequence[str], tasks: Sequence[str], dtype: str) -> Setup:
  """HF Llama/Mistral/Qwen2 causal-LM directories -> generative merging of the whole model.

  Every directory is an XForCausalLM of one architecture (sharded safetensors, checked from their
  headers, then read one tensor at a time with a NaN/Inf check). The merged tree is the whole model:
  there are no task heads, so every task reads the same merged model and `logits(params, t, batch)`
  is its (B, L, V) next-token logits whatever t; the objective is `train.next_token_entropy`. (Which
  tensors stay unmerged, such as the embeddings and lm_head, is the config's `merge.unmerged`.)
  `export(params, path)` writes one HF directory at path: the pretrained config.json, the merged
  weights in sharded safetensors and the tokenizer files.

  The fine-tuned inputs may instead all be PEFT LoRA adapter directories of the pretrained model
  (adapter_config.json + adapter_model.safetensors, `interop.peft`): every one is read and checked
  against the pretrained config.json before any pretrained tensor is read, and `finetuned` is then
  a `lora.Adapted` (the fine-tuned trees made from the factors when read). A list that mixes adapters
  and full models is refused.

  Args:
    pretrained: HF directory of the pretrained causal LM (also the default tokenizer directory).
    finetuned: one HF directory per task, the same architecture; or one PEFT adapter directory per task.
    tasks: the task names, in the order of `finetuned`.
    dtype: compute dtype name.
  """
  from adarank_jax.interop import hf, peft, safetensors_dir  # pylint: disable=g-import-not-at-top

  if len(tasks) != len(finetuned):
    raise ValueError(f"load_causal_lm: {len(tasks)} tasks but {len(finetuned)} fine-tuned directories")
  adapters = [str(p) for p in finetuned if peft.is_adapter_dir(p)]
  if adapters and len(adapters) != len(finetuned):
    full = [str(p) for p in finetuned if str(p) not in adapters]
    raise ValueError(
      f"the fine-tuned inputs mix PEFT adapters ({', '.join(adapters)}) and full models "
      f"({', '.join(full)}); give every task an adapter or every task a full model"
    )
  models = [pretrained] if adapters else [pretrained, *finetuned]
  not_decoders = [str(p) for p in models if not safetensors_dir.is_decoder_dir(p)]
  if not_decoders:
    raise ValueError(
      f"generative merging reads Llama, Mistral or Qwen2 causal-LM directories (config.json with a "
      f"model_type of {', '.join(decoder.MODEL_TYPES)}); these are not: {', '.join(not_decoders)}"
    )
  if adapters:
    opened = safetensors_dir.open_dir(pretrained)  # headers and config.json: no tensor read yet
    read = read_adapters(adapters, opened.config)
    pre_config, pre_tree = opened.config, opened.read_tree()
  else:
    pre_config, pre_tree = safetensors_dir.load(pretrained)
  pre_shapes = tree_util.shapes(tree_util.flatten(pre_tree))
  tuned = []
  full_models = () if adapters else finetuned
  for path, config in [(pretrained, pre_config)] + [(p, None) for p in full_models]:
    if config is None:
      config, tree = safetensors_dir.load(path)
      hf.check_compatible(pre_config, config, reference_source=pretrained, source=path)
      tree_util.check_structure(pre_shapes, tree_util.flatten(tree), source=str(path))
      tuned.append(tree)
    if not config.architecture.endswith("ForCausalLM"):
      raise ValueError(
        f"{Path(path) / 'config.json'}: a {config.architecture}; generative merging needs causal LMs "
        f"({', '.join(p + 'ForCausalLM' for p in decoder.MODEL_TYPES.values())})"
      )
  graphdef = functional.split(
    nnx.eval_shape(lambda: decoder.build(dataclasses.replace(pre_config, dtype=dtype), rngs=nnx.Rngs(0)))
  )[0]

  def forward(params, batch):
    return functional.call(graphdef, params, batch["input_ids"], batch["attention_mask"])

  jitted = jax.jit(forward)

  def export(params, path):
    hf_config = json.loads((Path(pretrained) / "config.json").read_text())
    safetensors_dir.save_sharded(jax.device_get(params), hf_config, path)
    for name in TOKENIZER_FILES:  # so the export is usable as it is, tokenizer included
      if (Path(pretrained) / name).is_file():
        shutil.copyfile(Path(pretrained) / name, Path(path) / name)

  return Setup(
    modality="prompts",
    merged=pre_tree,
    finetuned=lora.Adapted(pre_tree, [a.task() for a in read]) if adapters else tuple(tuned),
    logits=lambda params, t, batch: forward(params, batch),
    # one traced forward of the concatenated tasks' prompts; each task's rows are its logits
    train_logits=lambda layout: train.one_forward(forward, lambda t, logits: logits),
    tower_layouts=False,
    predict=lambda params, t, batch: jitted(params, batch),  # one compile serves every task
    export=export,
    tokenizer=str(pretrained),
    objective=train.next_token_entropy,
  )


def read_adapters(directories: Sequence[str], config: Any) -> list[Any]:
  """`peft.read` of every adapter directory against the base model's `config`: every bad one in one error
  (each naming its file and key)."""
  from adarank_jax.interop import peft  # pylint: disable=g-import-not-at-top

  read, problems = [], []
  for directory in directories:
    try:
      read.append(peft.read(directory, config))
    except (ValueError, OSError) as error:
      problems.append(str(error))
  if problems:
    raise ValueError(
      f"{len(problems)} of {len(directories)} adapter directories cannot be used:\n  " + "\n  ".join(problems)
    )
  return read
