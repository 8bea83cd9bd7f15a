"""Hugging Face model directories <-> param trees: RoBERTa, BERT, GPT-2 and the CLIP image tower.

Each family is a name table plus transform hooks (maxtext's split of "where"
from "how"): tree path -> (hook, HF keys). RoBERTa/BERT/GPT-2 trees mirror the
HF module names, so their tables are derived from the tree paths (kernel ->
weight, transposed unless the HF layer is GPT-2's Conv1D). The CLIP table maps
a `CLIPVisionModel` onto OpenCLIP's `VisionTransformer` layout and packs
q_proj|k_proj|v_proj into one (width, 3 * width) `in_proj` kernel:

  vision_model.embeddings.patch_embedding.weight (w, 3, p, p) <-> conv1/kernel (p, p, 3, w)
  vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.*   <-> transformer/resblocks/{i}/attn/in_proj/*
  vision_model.{pre_layrnorm,post_layernorm}                 <-> ln_pre, ln_post
  visual_projection.weight (CLIPModel, ...WithProjection)    <-> proj (w, output_dim)

Every state dict is checked against the expected keys and shapes (all
missing, unexpected and mis-shaped keys are reported at once) and for NaN/Inf
before a tree is built; errors name the file or directory. Buffers that hold
no parameters (position_ids, GPT-2's causal-mask `attn.bias`) are skipped, as
is the text tower of a CLIPModel. Values keep the checkpoint's dtype, so
state dict -> tree -> state dict is bit-exact. transformers is imported
lazily, only to fill HF's config defaults.

Converted models are stored as a directory with the original config.json and
the tree under params/ (`save_converted`, `load_converted`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from adarank_jax import checkpoint, files, tree_util
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.models import clip, gpt2, hf_checks, roberta

ModelConfig = roberta.RobertaConfig | gpt2.GPT2Config | clip.VisionConfig


@dataclasses.dataclass(frozen=True)
class Hook:
  """How one tree leaf is made from its HF tensors, and back."""

  to_tree: Callable[..., np.ndarray]  # HF tensors -> tree leaf
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # tree leaf -> HF tensors
  hf_shapes: Callable[[tuple[int, ...]], tuple[tuple[int, ...], ...]]  # leaf shape -> HF shapes


COPY = Hook(lambda a: a, lambda t: (t,), lambda s: (s,))
LINEAR = Hook(lambda w: w.T, lambda k: (k.T,), lambda s: (s[::-1],))  # (out, in) <-> (in, out)
CONV = Hook(
  lambda w: w.transpose(2, 3, 1, 0),
  lambda k: (k.transpose(3, 2, 0, 1),),
  lambda s: ((s[3], s[2], s[0], s[1]),),
)  # OIHW <-> HWIO
QKV_KERNEL = Hook(
  lambda q, k, v: np.concatenate([q.T, k.T, v.T], axis=1),
  lambda t: tuple(p.T for p in np.split(t, 3, axis=1)),
  lambda s: ((s[1] // 3, s[0]),) * 3,
)  # 3 x (w, w) <-> (w, 3w), q|k|v
QKV_BIAS = Hook(
  lambda q, k, v: np.concatenate([q, k, v]), lambda t: tuple(np.split(t, 3)), lambda s: ((s[0] // 3,),) * 3
)

Table = dict[str, tuple[Hook, tuple[str, ...]]]  # tree path -> (hook, HF keys)
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_GPT2_CONV1D = re.compile(r"(.*/)?h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel")


def _mirrored_table(shapes: Mapping[str, tuple[int, ...]], conv1d: re.Pattern | None) -> Table:
  """Table of a tree whose module names are HF's; kernels matching `conv1d` are not transposed."""
  table = {}
  for path in shapes:
    *modules, leaf = path.split("/")
    is_linear = leaf == "kernel" and not (conv1d and conv1d.fullmatch(path))
    table[path] = (LINEAR if is_linear else COPY, (".".join(modules + [_HF_LEAF[leaf]]),))
  return table


def _clip_table(shapes: Mapping[str, tuple[int, ...]]) -> Table:
  v = "vision_model."
  table: Table = {
    "conv1/kernel": (CONV, (f"{v}embeddings.patch_embedding.weight",)),
    "class_embedding": (COPY, (f"{v}embeddings.class_embedding",)),
    "positional_embedding": (COPY, (f"{v}embeddings.position_embedding.weight",)),
  }
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    table[f"{ours}/scale"] = (COPY, (f"{v}{theirs}.weight",))
    table[f"{ours}/bias"] = (COPY, (f"{v}{theirs}.bias",))
  if "proj" in shapes:
    table["proj"] = (LINEAR, ("visual_projection.weight",))
  layers = {int(p.split("/")[2]) for p in shapes if p.startswith("transformer/resblocks/")}
  for i in sorted(layers):
    ours, theirs = f"transformer/resblocks/{i}/", f"{v}encoder.layers.{i}."
    for name in ("kernel", "bias"):
      hook = QKV_KERNEL if name == "kernel" else QKV_BIAS
      table[f"{ours}attn/in_proj/{name}"] = (
        hook,
        tuple(f"{theirs}self_attn.{x}_proj.{_HF_LEAF[name]}" for x in "qkv"),
      )
    for our_ln, their_ln in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      table[f"{ours}{our_ln}/scale"] = (COPY, (f"{theirs}{their_ln}.weight",))
      table[f"{ours}{our_ln}/bias"] = (COPY, (f"{theirs}{their_ln}.bias",))
    for our_fc, their_fc in (
      ("attn/out_proj", "self_attn.out_proj"),
      ("mlp/c_fc", "mlp.fc1"),
      ("mlp/c_proj", "mlp.fc2"),
    ):
      table[f"{ours}{our_fc}/kernel"] = (LINEAR, (f"{theirs}{their_fc}.weight",))
      table[f"{ours}{our_fc}/bias"] = (COPY, (f"{theirs}{their_fc}.bias",))
  return table


def _clip_config(config: Mapping[str, Any]) -> clip.VisionConfig:
  """A VisionConfig (act 'quick_gelu' as HF CLIP) from a CLIPVisionModel or CLIPModel config dict."""
  if config["model_type"] == "clip":
    hf_checks.single_architecture(config, ("CLIPModel",))
    vision, output_dim = config["vision_config"], config["projection_dim"]
  else:
    architecture = hf_checks.single_architecture(config, ("CLIPVisionModel", "CLIPVisionModelWithProjection"))
    vision = config
    output_dim = config["projection_dim"] if architecture.endswith("WithProjection") else None
  if vision["num_channels"] != 3:
    raise ValueError(f"num_channels {vision['num_channels']} is not 3")
  return clip.VisionConfig(
    image_size=vision["image_size"],
    patch_size=vision["patch_size"],
    width=vision["hidden_size"],
    layers=vision["num_hidden_layers"],
    heads=vision["num_attention_heads"],
    mlp_width=vision["intermediate_size"],
    output_dim=output_dim,
    act=vision["hidden_act"],
    ln_eps=vision["layer_norm_eps"],
  )


def _nnx_shapes(module_fn: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
  model = nnx.eval_shape(module_fn)
  return tree_util.shapes(tree_util.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@dataclasses.dataclass(frozen=True)
class _Family:
  """What differs between model families."""

  model_types: tuple[str, ...]
  config_type: type
  from_hf_config: Callable[[Mapping[str, Any]], ModelConfig]
  shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # config -> flat tree path -> shape
  table: Callable[[Mapping[str, tuple[int, ...]]], Table]
  ignored: str  # regex of HF keys that are not parameters of the tree (buffers, other towers)
  head_fields: tuple[str, ...]  # config fields fine-tuned models may change


_FAMILIES = (
  _Family(
    ("roberta", "bert"),
    roberta.RobertaConfig,
    roberta.RobertaConfig.from_hf_config,
    lambda c: _nnx_shapes(lambda: roberta.build(c, rngs=nnx.Rngs(0))),
    lambda s: _mirrored_table(s, None),
    r"(.*\.)?embeddings\.(position_ids|token_type_ids)|roberta\.pooler\..*|lm_head\..*|cls\..*",
    ("architecture", "num_labels", "dtype"),
  ),
  _Family(
    ("gpt2",),
    gpt2.GPT2Config,
    gpt2.GPT2Config.from_hf_config,
    lambda c: _nnx_shapes(lambda: gpt2.build(c, rngs=nnx.Rngs(0))),
    lambda s: _mirrored_table(s, _GPT2_CONV1D),
    r"(.*\.)?h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight",
    ("architecture", "num_labels", "pad_token_id", "dtype"),
  ),
  _Family(
    ("clip_vision_model", "clip"),
    clip.VisionConfig,
    _clip_config,
    lambda c: tree_util.shapes(tree_util.flatten(clip.abstract_params(c))),
    _clip_table,
    r"(.*\.)?position_ids|text_model\..*|text_projection\.weight|logit_scale",
    ("output_dim",),
  ),
)
MODEL_TYPES = tuple(t for f in _FAMILIES for t in f.model_types)


def _family(config: Mapping[str, Any] | ModelConfig) -> _Family:
  """The family of a model config or of an HF config.json dict."""
  for family in _FAMILIES:
    if isinstance(config, family.config_type) or (
      isinstance(config, Mapping) and config["model_type"] in family.model_types
    ):
      return family
  what = config["model_type"] if isinstance(config, Mapping) else type(config).__name__
  raise ValueError(f"model type {what!r} is not one of {list(MODEL_TYPES)}")


def _complete(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` with transformers' defaults filled in (its `to_dict()` form)."""
  import transformers  # pylint: disable=g-import-not-at-top

  fields = dict(config)
  return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields).to_dict()


def model_config(hf_config: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
  """The model config (RobertaConfig, GPT2Config or clip.VisionConfig) of an HF config.json dict."""
  try:
    if "model_type" not in hf_config:
      raise ValueError("no model_type")
    family = _family(hf_config)
    return family.from_hf_config(_complete(hf_config))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{source}: unsupported or invalid config: {type(e).__name__}: {e}") from e


def _plan(config: ModelConfig) -> tuple[_Family, dict[str, tuple[int, ...]], Table]:
  family = _family(config)
  shapes = family.shapes(config)
  return family, shapes, family.table(shapes)


def tree_from_state_dict(
  config: ModelConfig, state: Mapping[str, np.ndarray], *, source: str
) -> dict[str, Any]:
  """Validates an HF state dict against `config` and builds the param tree.

  Args:
    config: from `model_config`.
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
  family, shapes, table = _plan(config)
  expected = {}
  for path, (hook, keys) in table.items():
    expected.update(zip(keys, hook.hf_shapes(shapes[path])))
  ignored = re.compile(family.ignored)
  used = {k: v for k, v in state.items() if not ignored.fullmatch(k)}
  first_parts = {k.split(".")[0] for k in expected}
  prefix = first_parts.pop() if len(first_parts) == 1 else ""
  if prefix and not any(k.startswith(f"{prefix}.") for k in used):
    used = {f"{prefix}.{k}": v for k, v in used.items()}
  try:
    tree_util.check_structure(expected, used, source=source)
  except tree_util.StructureError as e:
    raise tree_util.StructureError(
      f"{e}\n  (expected the {_name(config)} layout given by config.json)"
    ) from None
  # Every parameter of these families is floating point (integer buffers such as position_ids are in
  # the family's `ignored` keys, never expected).
  state_dict_lib.check_dtypes(dict.fromkeys(expected, np.float32), used, source=source)
  tree_util.check_finite(used, source=source)
  return tree_util.unflatten(
    {
      path: np.ascontiguousarray(hook.to_tree(*(used[k] for k in keys)))
      for path, (hook, keys) in table.items()
    }
  )


def state_dict_from_tree(
  config: ModelConfig, tree: Mapping[str, Any], *, source: str = "tree"
) -> dict[str, np.ndarray]:
  """Inverse of `tree_from_state_dict` (prefixed HF keys); validates `tree` first."""
  _, shapes, table = _plan(config)
  flat = {k: np.asarray(v) for k, v in tree_util.flatten(tree).items()}
  tree_util.check_structure(shapes, flat, source=source)
  tree_util.check_finite(flat, source=source)
  state = {}
  for path, (hook, keys) in table.items():
    state.update(zip(keys, map(np.ascontiguousarray, hook.to_hf(flat[path]))))
  return state


def _name(config: ModelConfig) -> str:
  return "CLIP vision" if isinstance(config, clip.VisionConfig) else config.architecture


def _weights_file(directory: Path) -> str:
  for name in state_dict_lib.HF_WEIGHT_FILES:
    for candidate in (directory / name, directory / f"{name}.index.json"):
      if candidate.is_file():
        return str(candidate)
  return str(directory)


def _read_config(directory: Path) -> dict[str, Any]:
  path = directory / "config.json"
  if not path.is_file():
    raise state_dict_lib.CheckpointError(f"{directory}: not a Hugging Face model directory (no config.json)")
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise state_dict_lib.CheckpointError(f"{path}: unreadable config: {e}") from e


def load_hf(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
  """(model config, param tree) of a local HF directory (config.json + model.safetensors or
  pytorch_model.bin, possibly sharded) or of one written by `save_converted` (config.json + params/,
  checked against its config). model_type roberta, bert, gpt2, clip_vision_model, clip."""
  directory = Path(directory)
  if (directory / PARAMS).is_dir():  # a directory written by `save_converted` (python -m convert.hf)
    config, tree, _ = load_converted(directory)
    flat = tree_util.flatten(tree)
    tree_util.check_structure(_plan(config)[1], flat, source=str(directory / PARAMS))
    state_dict_lib.check_dtypes(dict.fromkeys(flat, np.float32), flat, source=str(directory / PARAMS))
    tree_util.check_finite(flat, source=str(directory / PARAMS))
    return config, tree
  config = model_config(_read_config(directory), source=str(directory / "config.json"))
  _, state = state_dict_lib.load_hf_directory(directory)
  return config, tree_from_state_dict(config, state, source=_weights_file(directory))


def export_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The config.json of an exported tree: unchanged, except that a CLIPModel's (whose text
  tower is not kept) becomes a CLIPVisionModelWithProjection config."""
  if hf_config["model_type"] != "clip":
    return dict(hf_config)
  complete = _complete(hf_config)
  return {
    **complete["vision_config"],
    "model_type": "clip_vision_model",
    "architectures": ["CLIPVisionModelWithProjection"],
    "projection_dim": complete["projection_dim"],
  }


def save_hf(tree: Mapping[str, Any], hf_config: Mapping[str, Any], directory: str | os.PathLike) -> None:
  """Writes `tree` as an HF directory (config.json + model.safetensors) that transformers'
  `from_pretrained` loads; `hf_config` is the config.json the tree was loaded with."""
  config = model_config(hf_config)
  state = state_dict_from_tree(config, tree)
  state_dict_lib.save_hf_directory(export_config(hf_config), state, directory)


def check_compatible(
  reference: ModelConfig, config: ModelConfig, *, reference_source: str, source: str
) -> None:
  """Raises StructureError unless `config` has the body of `reference` (heads may differ)."""
  if type(reference) is not type(config):
    raise tree_util.StructureError(
      f"{source}: a {type(config).__name__} model, but {reference_source} is a "
      f"{type(reference).__name__} model"
    )
  head = _family(config).head_fields
  diffs = [
    f"{f.name}={getattr(config, f.name)!r} (reference: {getattr(reference, f.name)!r})"
    for f in dataclasses.fields(config)
    if f.name not in head and getattr(config, f.name) != getattr(reference, f.name)
  ]
  if diffs:
    raise tree_util.StructureError(
      f"{source}: architecture differs from {reference_source}: {'; '.join(diffs)}"
    )


PARAMS = "params"


def save_converted(
  directory: str | os.PathLike, hf_config: Mapping[str, Any], tree: Mapping[str, Any]
) -> None:
  """Writes directory/config.json (the HF config, unchanged) and directory/params (the tree)."""
  directory = Path(directory)
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(dict(hf_config), indent=2) + "\n")
  checkpoint.save_tree(directory / PARAMS, dict(tree))


def load_converted(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], dict]:
  """(model config, tree, HF config dict) of a directory written by `save_converted`."""
  directory = Path(directory)
  hf_config = _read_config(directory)
  return (
    model_config(hf_config, source=str(directory / "config.json")),
    checkpoint.load_tree(directory / PARAMS),
    hf_config,
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
  model (as convert.openclip lays out its trees), each as `save_converted` writes it.

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
    for source, target in progress(list(zip(sources, targets)), "write"):
      save_converted(tmp / target, _read_config(source), load_hf(source)[1])

  files.replace_dir(out, fill)


def export(converted: str | os.PathLike, out: str | os.PathLike) -> None:
  """Writes a `save_converted` directory back as an HF directory (see `save_hf`)."""
  _, tree, hf_config = load_converted(converted)
  save_hf(tree, hf_config, out)
