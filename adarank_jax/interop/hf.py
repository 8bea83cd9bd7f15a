"""Hugging Face model directories and converted directories <-> param trees: RoBERTa, BERT, GPT-2, the
Llama/Mistral/Qwen2 decoders and the CLIP image tower.

Each architecture is a key map (`keymap.Rule`s: tree path -> HF keys, hook). RoBERTa/BERT/GPT-2/decoder trees
mirror the HF module names, so their rules only rename leaves (kernel -> weight, transposed unless the HF layer
is GPT-2's Conv1D). The CLIP rules map a `CLIPVisionModel` onto OpenCLIP's `VisionTransformer` layout and pack
q_proj|k_proj|v_proj into one (width, 3 * width) `in_proj` kernel:

  vision_model.embeddings.patch_embedding.weight (w, 3, p, p) <-> conv1/kernel (p, p, 3, w)
  vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*   <-> transformer/resblocks/{i}/attn/in_proj/*
  vision_model.{pre_layrnorm,post_layernorm}                 <-> ln_pre, ln_post
  visual_projection.weight (CLIPModel, ...WithProjection)    <-> proj (w, output_dim)

Every state dict is checked against the expected keys and shapes (all missing, unexpected and mis-shaped
keys are reported at once) and for NaN/Inf before a tree is built; errors name the file or directory.
Buffers that hold no parameters (position_ids, GPT-2's causal-mask `attn.bias`, the rotary `inv_freq` of
older Llama checkpoints) are skipped, as is the text tower of a CLIPModel. A decoder with tied embeddings has
no lm_head in its tree; transformers does not save one for it (a stored `lm_head.weight` is reported as an
unexpected key). Values keep the checkpoint's dtype, so state dict -> tree -> state dict is
bit-exact. config.json dicts are parsed by `hf_config`. Converted models are `interop.converted`
directories (config.json + params/).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.interop import converted, keymap
from adarank_jax.interop import hf_config as config_lib
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.interop.hf_config import ModelConfig
from adarank_jax.interop.keymap import Rule
from adarank_jax.models import clip, decoder, gpt2, roberta
from adarank_jax.storage import files

# Trees that mirror HF's module names: only the leaf names differ.
_MIRRORED = (
  Rule(r"(.*)/kernel", (r"\1.weight",), keymap.LINEAR),  # (in, out) <-> torch Linear (out, in)
  Rule(r"(.*)/(scale|embedding)", (r"\1.weight",)),
  Rule(r"(.*)/bias", (r"\1.bias",)),
)
ROBERTA = _MIRRORED
DECODER = _MIRRORED  # model/layers/{i}/self_attn/q_proj/kernel <-> model.layers.{i}.self_attn.q_proj.weight
GPT2 = (  # GPT-2's Conv1D layers store (in, out) already
  Rule(r"((?:.*/)?h/\d+/(?:attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj))/kernel", (r"\1.weight",)),
) + _MIRRORED
_LAYER, _V = r"transformer/resblocks/(\d+)/", "vision_model."
_HF_LAYER = _V + r"encoder.layers.\1."
CLIP_VISION = (
  Rule(r"conv1/kernel", (_V + "embeddings.patch_embedding.weight",), keymap.CONV),
  Rule(r"class_embedding", (_V + "embeddings.class_embedding",)),
  Rule(r"positional_embedding", (_V + "embeddings.position_embedding.weight",)),
  Rule(r"proj", ("visual_projection.weight",), keymap.LINEAR),
  Rule(
    _LAYER + "attn/in_proj/kernel",
    tuple(f"{_HF_LAYER}self_attn.{x}_proj.weight" for x in "qkv"),
    keymap.QKV_KERNEL,
  ),
  Rule(
    _LAYER + "attn/in_proj/bias", tuple(f"{_HF_LAYER}self_attn.{x}_proj.bias" for x in "qkv"), keymap.QKV_BIAS
  ),
) + tuple(
  rule
  for ours, theirs in (
    ("ln_pre", _V + "pre_layrnorm"),
    ("ln_post", _V + "post_layernorm"),
    (_LAYER + "ln_1", _HF_LAYER + "layer_norm1"),
    (_LAYER + "ln_2", _HF_LAYER + "layer_norm2"),
    (_LAYER + "attn/out_proj", _HF_LAYER + "self_attn.out_proj"),
    (_LAYER + "mlp/c_fc", _HF_LAYER + "mlp.fc1"),
    (_LAYER + "mlp/c_proj", _HF_LAYER + "mlp.fc2"),
  )
  for rule in (
    Rule(ours + "/kernel", (theirs + ".weight",), keymap.LINEAR),
    Rule(ours + "/scale", (theirs + ".weight",)),
    Rule(ours + "/bias", (theirs + ".bias",)),
  )
)


def _nnx_abstract(module_fn: Callable[[], nnx.Module]) -> dict[str, Any]:
  return tree_util.flatten(nnx.to_pure_dict(nnx.state(nnx.eval_shape(module_fn), nnx.Param)))


@dataclasses.dataclass(frozen=True)
class _Architecture:
  """What differs between the architectures."""

  config_type: type
  abstract: Callable[[Any], dict[str, Any]]  # config -> flat tree path -> abstract leaf (shape, dtype)
  rules: keymap.KeyMap
  ignored: str  # regex of HF keys that are not parameters of the tree (buffers, other towers)
  head_fields: tuple[str, ...]  # config fields fine-tuned models may change


_ARCHITECTURES = (
  _Architecture(
    roberta.RobertaConfig,
    lambda c: _nnx_abstract(lambda: roberta.build(c, rngs=nnx.Rngs(0))),
    ROBERTA,
    r"(.*\.)?embeddings\.(position_ids|token_type_ids)|roberta\.pooler\..*|lm_head\..*|cls\..*",
    ("architecture", "num_labels", "dtype"),
  ),
  _Architecture(
    gpt2.GPT2Config,
    lambda c: _nnx_abstract(lambda: gpt2.build(c, rngs=nnx.Rngs(0))),
    GPT2,
    r"(.*\.)?h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight",
    ("architecture", "num_labels", "pad_token_id", "dtype"),
  ),
  _Architecture(
    decoder.DecoderConfig,
    lambda c: _nnx_abstract(lambda: decoder.build(c, rngs=nnx.Rngs(0))),
    DECODER,
    r"(.*\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    ("architecture", "num_labels", "pad_token_id", "tie_word_embeddings", "dtype"),
  ),
  _Architecture(
    clip.VisionConfig,
    lambda c: tree_util.flatten(clip.abstract_params(c)),
    CLIP_VISION,
    r"(.*\.)?position_ids|text_model\..*|text_projection\.weight|logit_scale",
    ("output_dim",),
  ),
)


def _architecture(config: ModelConfig) -> _Architecture:
  for architecture in _ARCHITECTURES:
    if isinstance(config, architecture.config_type):
      return architecture
  raise TypeError(f"{type(config).__name__} is not one of {[f.config_type.__name__ for f in _ARCHITECTURES]}")


def tree_from_state_dict(
  config: ModelConfig, state: Mapping[str, np.ndarray], *, source: str
) -> dict[str, Any]:
  """Validates an HF state dict against `config` and builds the param tree.

  Args:
    config: from `hf_config.model_config`.
    state: HF key -> array (PyTorch layouts). A state dict saved without the
      prefix every expected key shares ('transformer.' for GPT2LMHeadModel as
      on the hub, 'vision_model.' for CLIPVisionModel as transformers 5 saves
      it) is accepted.
    source: the file or directory the state dict came from, named in errors.

  Returns:
    Nested dict of numpy arrays (kernels (in, out), conv HWIO), stored dtypes.

  Raises:
    tree_util.StructureError: missing, unexpected or mis-shaped keys, or integer/bool
      tensors where the architecture has float weights.
    tree_util.NonFiniteError: NaN or Inf in a used tensor.
  """
  architecture = _architecture(config)
  abstract = architecture.abstract(config)
  ignored = re.compile(architecture.ignored)
  used = {k: v for k, v in state.items() if not ignored.fullmatch(k)}
  first_parts = {k.split(".")[0] for k in keymap.expected_keys(architecture.rules, abstract)}
  prefix = first_parts.pop() if len(first_parts) == 1 else ""
  if prefix and not any(k.startswith(f"{prefix}.") for k in used):
    used = {f"{prefix}.{k}": v for k, v in used.items()}
  # Every parameter of these architectures is floating point (integer buffers such as position_ids are in
  # the architecture's `ignored` keys, never expected).
  return keymap.tree_from_state_dict(
    architecture.rules,
    abstract,
    used,
    source=source,
    hint=f"(expected the {_name(config)} layout given by config.json)",
  )


def state_dict_from_tree(
  config: ModelConfig, tree: Mapping[str, Any], *, source: str = "tree"
) -> dict[str, np.ndarray]:
  """Inverse of `tree_from_state_dict` (prefixed HF keys); validates `tree` first."""
  architecture = _architecture(config)
  flat = {k: np.asarray(v) for k, v in tree_util.flatten(tree).items()}
  keymap.check_tree(architecture.abstract(config), flat, source=source)
  return keymap.state_dict_from_tree(architecture.rules, tree, source=source)


def key_layout(config: ModelConfig) -> tuple[dict[str, Any], keymap.KeyMap, str]:
  """(flat tree path -> abstract leaf (shape, dtype), key map, regex of the HF keys that are no parameters of
  the tree) of `config`'s architecture: what `tree_from_state_dict` checks a state dict against."""
  architecture = _architecture(config)
  return architecture.abstract(config), architecture.rules, architecture.ignored


def linear_kernels(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
  """HF Linear weight key -> (tree path, kernel shape (n_in, n_out)) of every layer the architecture keeps
  as one transposed torch Linear (a one-key `keymap.LINEAR` rule): the layers a LoRA adapter can target.

  Keys carry the prefix `tree_from_state_dict` expects, e.g. 'model.layers.0.self_attn.q_proj.weight' for a
  LlamaForCausalLM. GPT-2's Conv1D layers and CLIP's packed q|k|v are not Linear layers here.
  """
  architecture = _architecture(config)
  abstract = architecture.abstract(config)
  plan = keymap.resolve(architecture.rules, abstract, source=_name(config))
  return {
    keys[0]: (path, tuple(abstract[path].shape))
    for path, (hook, keys) in plan.items()
    if hook is keymap.LINEAR and len(keys) == 1
  }


def _name(config: ModelConfig) -> str:
  return "CLIP vision" if isinstance(config, clip.VisionConfig) else config.architecture


def _weights_file(directory: Path) -> str:
  for name in state_dict_lib.HF_WEIGHT_FILES:
    for candidate in (directory / name, directory / f"{name}.index.json"):
      if candidate.is_file():
        return str(candidate)
  return str(directory)


def _read_config(directory: Path) -> dict[str, Any]:
  if not (directory / converted.HF_CONFIG).is_file():
    raise state_dict_lib.CheckpointError(f"{directory}: not a Hugging Face model directory (no config.json)")
  return converted.read_config(directory, converted.HF_CONFIG)


def load_hf(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
  """(model config, param tree) of a local HF directory (config.json + model.safetensors or
  pytorch_model.bin, possibly sharded) or of a converted one (`load_converted`). model_type roberta, bert,
  gpt2, llama, mistral, qwen2, clip_vision_model, clip."""
  directory = Path(directory)
  if converted.is_converted(directory):  # python -m convert.hf output
    config, tree, _ = load_converted(directory)
    return config, tree
  config = config_lib.model_config(_read_config(directory), source=str(directory / converted.HF_CONFIG))
  _, state = state_dict_lib.load_hf_directory(directory)
  return config, tree_from_state_dict(config, state, source=_weights_file(directory))


def load_converted(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
  """(model config, tree, config.json dict) of a converted HF directory (`converted.load`), the tree
  checked against the config (keys, shapes, dtypes, finiteness)."""
  found = converted.load(directory)
  if found.config_file != converted.HF_CONFIG:
    raise state_dict_lib.CheckpointError(
      f"{directory}: a converted model with {found.config_file}, not a Hugging Face one ({converted.HF_CONFIG})"
    )
  config = config_lib.model_config(found.config, source=str(Path(directory) / found.config_file))
  keymap.check_tree(
    _architecture(config).abstract(config), tree_util.flatten(found.tree), source=os.fspath(directory)
  )
  return config, found.tree, found.config


def save_hf(tree: Mapping[str, Any], hf_config: Mapping[str, Any], directory: str | os.PathLike) -> None:
  """Writes `tree` as an HF directory (config.json + model.safetensors) that transformers'
  `from_pretrained` loads; `hf_config` is the config.json the tree was loaded with."""
  config = config_lib.model_config(hf_config)
  state = state_dict_from_tree(config, tree)
  state_dict_lib.save_hf_directory(config_lib.export_config(hf_config), state, directory)


def check_compatible(
  reference: ModelConfig, config: ModelConfig, *, reference_source: str, source: str
) -> None:
  """Raises StructureError unless `config` has the body of `reference` (heads may differ)."""
  if type(reference) is not type(config):
    raise tree_util.StructureError(
      f"{source}: a {type(config).__name__} model, but {reference_source} is a "
      f"{type(reference).__name__} model"
    )
  head = _architecture(config).head_fields
  diffs = [
    f"{f.name}={getattr(config, f.name)!r} (reference: {getattr(reference, f.name)!r})"
    for f in dataclasses.fields(config)
    if f.name not in head and getattr(config, f.name) != getattr(reference, f.name)
  ]
  if diffs:
    raise tree_util.StructureError(
      f"{source}: architecture differs from {reference_source}: {'; '.join(diffs)}"
    )


def finetuned_directories(parent: str | os.PathLike) -> list[Path]:
  """The model directories (non-hidden sub-directories) of `parent`, sorted by name."""
  parent = Path(parent)
  if not parent.is_dir():
    raise state_dict_lib.CheckpointError(f"{parent}: no such directory")
  found = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not found:
    raise state_dict_lib.CheckpointError(f"{parent}: no model directories in it")
  return found


def convert(
  pretrained: str | os.PathLike,
  finetuned: Sequence[str | os.PathLike],
  out: str | os.PathLike,
  *,
  progress: Callable[[Iterable[Path], str], Iterable[Path]] = lambda items, desc: items,
) -> None:
  """Converts a pretrained and several fine-tuned HF directories; all or nothing.

  Every input is read and validated (weights, config, same body as the
  pretrained model) before anything is written; the result is built next to
  `out` and renamed into place: out/pretrained/ and out/<name>/ per fine-tuned
  model (as convert.openclip lays out its models), each a `converted` directory
  (config.json, unchanged, + params/).

  Args:
    pretrained: HF directory of the pretrained model.
    finetuned: HF directories of the fine-tuned models (names must be unique and
      not 'pretrained').
    out: output directory; must not exist yet.
    progress: wraps each iteration over the models, given the phase
      ('validate', 'write'): e.g. `lambda it, desc: tqdm.tqdm(it, desc=desc)`.
  """
  out = Path(out)
  if out.exists():
    raise FileExistsError(f"{out}: already exists; refusing to overwrite")
  sources = [Path(pretrained)] + [Path(p) for p in finetuned]
  names = [p.name for p in sources[1:]]
  duplicates = sorted({n for n in names if names.count(n) > 1 or n == "pretrained"})
  if duplicates:
    raise ValueError(f'fine-tuned directory names must be unique and not "pretrained": {duplicates}')
  targets = ["pretrained"] + names
  configs = []
  for source in progress(sources, "validate"):  # Pass 1: read and check all, keep nothing.
    configs.append(load_hf(source)[0])
    check_compatible(configs[0], configs[-1], reference_source=str(sources[0]), source=str(source))

  def fill(tmp: Path) -> None:
    tmp.mkdir()
    for source, target in progress(list(zip(sources, targets)), "write"):
      converted.save(
        tmp / target, config_file=converted.HF_CONFIG, config=_read_config(source), tree=load_hf(source)[1]
      )

  files.replace_dir(out, fill)


def export(directory: str | os.PathLike, out: str | os.PathLike) -> None:
  """Writes a converted HF directory back as an HF directory (see `save_hf`)."""
  _, tree, hf_config = load_converted(directory)
  save_hf(tree, hf_config, out)
