"""OpenCLIP state dicts and converted directories <-> CLIP param trees of `adarank_jax.models.clip`.

The mapping is one key map (`keymap.Rule`s) from a tree path (relative to a tower) to the OpenCLIP key,
with a hook per rule (Linear weights (out, in) -> kernels (in, out); conv OIHW -> HWIO). Both directions
use the same rules, so state dict -> tree -> state dict is bit-identical (values and dtypes; trees keep
the stored dtype).

  visual.conv1.weight (768, 3, 32, 32)                  <-> visual/conv1/kernel (32, 32, 3, 768)
  visual.transformer.resblocks.0.attn.in_proj_weight    <-> visual/transformer/resblocks/0/attn/in_proj/kernel
  visual.ln_pre.weight                                  <-> visual/ln_pre/scale
  token_embedding.weight                                <-> text/token_embedding/embedding
  transformer.resblocks.0.mlp.c_fc.weight               <-> text/transformer/resblocks/0/mlp/c_fc/kernel
  logit_scale                                           <-> logit_scale

The image tower alone (what AdaRank merges) is read from the `visual.*` keys of a CLIP checkpoint (its text
keys are ignored, as are the leftovers in Task Arithmetic's image-encoder checkpoints) or from a
`model.visual.state_dict()` without the prefix. Keys, shapes and finiteness are checked before a tree is
built; errors name the file and the keys. torch is needed only for .pt/.bin files. Model configs are
parsed by `openclip_config`, once, and the parsed `clip.CLIPConfig` is passed down; converted models are
`interop.converted` directories holding the model-config JSON they were converted with.
"""

import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adarank_jax.core import tree_util
from adarank_jax.interop import keymap, openclip_config
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.interop.keymap import Rule
from adarank_jax.models import clip

VISUAL_PREFIX = "visual."
CHECKPOINT_SUFFIXES = (".safetensors",) + state_dict_lib.TORCH_SUFFIXES
PRETRAINED_NAME = "pretrained"
PRETRAINED_CLIP_NAME = "pretrained_clip"

# A tower's rules: tower-relative tree path -> OpenCLIP key ('/' become '.'), hook.
TOWER = (
  Rule(r"conv1/kernel", ("conv1.weight",), keymap.CONV),
  Rule(r"(.*)/in_proj/kernel", (r"\1.in_proj_weight",), keymap.LINEAR),  # packed q|k|v
  Rule(r"(.*)/in_proj/bias", (r"\1.in_proj_bias",)),
  Rule(r"(.*)/kernel", (r"\1.weight",), keymap.LINEAR),  # out_proj, c_fc, c_proj
  Rule(r"(.*)/(scale|embedding)", (r"\1.weight",)),  # LayerNorm, token_embedding
  Rule(r"(.*)", (r"\1",)),  # biases, class/positional embeddings, proj, text_projection
)
# A CLIP tree: OpenCLIP keeps the text tower at top level.
CLIP = (
  keymap.prefixed(TOWER, "visual/", VISUAL_PREFIX)
  + keymap.prefixed(TOWER, "text/", "")
  + (Rule(r"logit_scale", ("logit_scale",)),)
)

# Text-tower and CLIP-head keys, ignored when only the image tower is read from a prefixed checkpoint.
_TEXT_KEYS = re.compile(
  r"token_embedding\.weight|positional_embedding|transformer\..+"
  r"|ln_final\.(weight|bias)|text_projection|logit_scale|logit_bias|attn_mask"
)


def _abstract(config: clip.VisionConfig | clip.CLIPConfig) -> dict[str, Any]:
  return tree_util.flatten(clip.abstract_params(config))


def tree_from_state_dict(
  state_dict: Mapping[str, np.ndarray], config: clip.VisionConfig | clip.CLIPConfig, *, source: str
) -> dict[str, Any]:
  """Validates an OpenCLIP state dict against `config`, then builds the param tree.

  Args:
    state_dict: OpenCLIP key -> array in torch layouts (as `state_dict.load_state_dict` returns).
    config: a VisionConfig -> a VisionTransformer tree, from the `visual.*` keys (other CLIP keys are
      ignored) or, when no key has that prefix, from an image-tower state dict. A CLIPConfig -> a CLIP
      tree ({'visual', 'text', 'logit_scale'}); every CLIP key is then required.
    source: where the state dict came from (the file), named in errors.

  Returns:
    Nested dict of numpy arrays in the tree layouts (kernels (in, out), conv HWIO), dtypes as stored.

  Raises:
    tree_util.StructureError: missing or unexpected keys, or shapes of another architecture (e.g. ViT-B/16
      weights for a ViT-B/32 config), or integer/bool arrays for float weights; all of them are listed.
    tree_util.NonFiniteError: NaN or Inf in a tensor the tree uses.
  """
  if isinstance(config, clip.CLIPConfig):
    rules, used = CLIP, dict(state_dict)
  else:
    prefix = VISUAL_PREFIX if any(k.startswith(VISUAL_PREFIX) for k in state_dict) else ""
    rules = keymap.prefixed(TOWER, "", prefix)
    used = {
      k: v for k, v in state_dict.items() if not prefix or k.startswith(prefix) or not _TEXT_KEYS.fullmatch(k)
    }
  return keymap.tree_from_state_dict(
    rules,
    _abstract(config),
    used,
    source=source,
    hint=f"The checkpoint does not match the expected OpenCLIP architecture {config}.",
  )


def state_dict_from_tree(tree: Mapping[str, Any], *, prefix: str = VISUAL_PREFIX) -> dict[str, np.ndarray]:
  """Inverse of `tree_from_state_dict`: OpenCLIP key -> numpy array (dtypes kept).

  Args:
    tree: a CLIP tree ({'visual', 'text', 'logit_scale'}) or a VisionTransformer tree.
    prefix: key prefix for a VisionTransformer tree: 'visual.' (keys of a full OpenCLIP CLIP, loadable with
      `model.load_state_dict(sd, strict=False)`) or '' (keys of `model.visual`). A CLIP tree always maps to
      the full CLIP layout.
  """
  if "visual" in tree:
    if prefix != VISUAL_PREFIX:
      raise ValueError(
        f"prefix={prefix!r} applies to VisionTransformer trees; a CLIP tree always maps to the "
        f"full OpenCLIP layout."
      )
    return keymap.state_dict_from_tree(CLIP, tree)
  return keymap.state_dict_from_tree(keymap.prefixed(TOWER, "", prefix), tree)


def load_openclip(
  path: str | os.PathLike, config: clip.CLIPConfig, *, text: bool = False, run_pickled_code: bool = False
) -> dict[str, Any]:
  """Reads an OpenCLIP checkpoint file, or a model converted by `convert_checkpoints`, into a param tree.

  Args:
    path: .safetensors / .pt / .pth / .bin / .ckpt. Wrappers ({'state_dict': ...}) and 'module.'/'model.'
      prefixes are handled by `state_dict.load_state_dict`. A directory is a converted model
      (`python -m convert.openclip` output: <out>/<task>, <out>/pretrained, <out>/pretrained_clip), checked
      against the config like a file, and against the model config it was converted with.
    config: the parsed model config (`openclip_config.load_config`).
    text: False -> VisionTransformer tree (the image tower); True -> CLIP tree (needs the text tower).
    run_pickled_code: allow files that pickle whole modules (runs code from the file: trusted files only).
  """
  if not isinstance(config, clip.CLIPConfig):
    raise TypeError(
      f"config must be a parsed clip.CLIPConfig (openclip_config.load_config), got {type(config).__name__}"
    )
  if os.path.isdir(path):
    stored, tree = load_converted(path)
    if text and "visual" not in tree:
      raise tree_util.StructureError(
        f"{os.fspath(path)}: an image tower alone; the pretrained model needs the text tower too (convert "
        f"it with --with-text and use <out>/pretrained_clip)"
      )
    if not text:
      stored, config, tree = stored.vision, config.vision, tree.get("visual", tree)
    if stored != config:
      raise tree_util.StructureError(
        f"{os.fspath(path)}: converted with another model config: {stored}, expected {config}"
      )
    return tree
  state = state_dict_lib.load_state_dict(path, run_pickled_code=run_pickled_code)
  return tree_from_state_dict(state, config if text else config.vision, source=os.fspath(path))


def load_converted(directory: str | os.PathLike) -> tuple[clip.CLIPConfig, dict[str, Any]]:
  """(model config, tree) of a converted OpenCLIP directory: an image tower, or a CLIP tree (converted
  --with-text), checked against the model config stored with it (keys, shapes, dtypes, finiteness)."""
  from adarank_jax.interop import converted  # pylint: disable=g-import-not-at-top (orbax)

  found = converted.load(directory)
  if found.config_file != converted.OPENCLIP_CONFIG:
    raise state_dict_lib.CheckpointError(
      f"{directory}: a converted model with {found.config_file}, not an OpenCLIP one ({converted.OPENCLIP_CONFIG})"
    )
  config_path = pathlib.Path(directory) / found.config_file
  config = openclip_config.config_from_dict(found.config, source=str(config_path))
  tree = found.tree
  abstract = _abstract(config if "visual" in tree else config.vision)
  keymap.check_tree(abstract, tree_util.flatten(tree), source=os.fspath(directory))
  return config, tree


def export_openclip(tree: Mapping[str, Any], path: str | os.PathLike, *, prefix: str = VISUAL_PREFIX) -> None:
  """Writes `tree` as an OpenCLIP state dict to a .safetensors or .pt file, atomically.

  See `state_dict_from_tree` for `prefix`. The tree is not checked against a config.
  """
  state_dict_lib.save_state_dict(state_dict_from_tree(tree, prefix=prefix), path)


def export(directory: str | os.PathLike, path: str | os.PathLike, *, prefix: str = VISUAL_PREFIX) -> None:
  """Writes a converted OpenCLIP directory (checked by `load_converted`) as a state dict file."""
  export_openclip(load_converted(directory)[1], path, prefix=prefix)


# ------------------------------------------------------------------------------------------ batch conversion


def find_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, pathlib.Path]:
  """Task name -> checkpoint file, from checkpoint files and folders.

  A file is one task named by its stem ('dtd.safetensors' -> 'dtd'). A folder contributes each checkpoint
  file in it (named by stem) and each subfolder (named by the subfolder) holding exactly one checkpoint file,
  or several of which one is 'finetuned.*' (Task Arithmetic's layout). Other files are skipped.

  Raises:
    ValueError: a path does not exist, a subfolder is empty or ambiguous, two checkpoints share a name, or
      nothing was found.
  """
  found: dict[str, list[pathlib.Path]] = {}
  for path in map(pathlib.Path, paths):
    if path.is_file():
      found.setdefault(path.stem, []).append(path)
    elif path.is_dir():
      for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.suffix in CHECKPOINT_SUFFIXES:
          found.setdefault(entry.stem, []).append(entry)
        elif entry.is_dir():
          files = sorted(f for f in entry.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
          named = [f for f in files if f.stem == "finetuned"]
          if len(files) != 1 and len(named) != 1:
            raise ValueError(
              f"{entry}: expected one checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) or "
              f"one named finetuned.*; found {[f.name for f in files]}."
            )
          found.setdefault(entry.name, []).append(files[0] if len(files) == 1 else named[0])
    else:
      raise ValueError(f"{path}: no such checkpoint file or folder.")
  shared = {name: [str(p) for p in files] for name, files in found.items() if len(files) > 1}
  if shared:
    raise ValueError(f"Several checkpoints share a task name: {shared}.")
  if not found:
    raise ValueError(f"No checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) in {[str(p) for p in paths]}.")
  return {name: files[0] for name, files in sorted(found.items())}


def convert_checkpoints(
  config_name_or_path: str | os.PathLike,
  pretrained: str | os.PathLike,
  finetuned: Mapping[str, str | os.PathLike],
  out_dir: str | os.PathLike,
  *,
  with_text: bool = False,
  run_pickled_code: bool = False,
  progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items,
) -> list[pathlib.Path]:
  """Converts one pretrained and many fine-tuned OpenCLIP checkpoints into converted directories.

  The model config is read and parsed once, before any checkpoint. Every input is then read and validated;
  if any is bad, nothing is written and one ValueError lists all the problems. Then each image tower is
  saved (`converted.save`, with the model-config JSON) as out_dir/<task name>, the pretrained one as
  out_dir/pretrained (and with `with_text` its full CLIP as out_dir/pretrained_clip).

  Args:
    config_name_or_path: OpenCLIP model config name or JSON path.
    pretrained: the pretrained checkpoint file.
    finetuned: task name -> fine-tuned checkpoint file, e.g. from `find_checkpoints`.
    out_dir: output folder; none of the outputs may exist yet.
    with_text: also store the pretrained CLIP with its text tower.
    run_pickled_code: allow checkpoints that pickle whole modules.
    progress: wraps each pass's iterable with a description ('validating', 'converting'), e.g. tqdm.

  Returns:
    The directories written.
  """
  from adarank_jax.interop import converted  # pylint: disable=g-import-not-at-top  (orbax only when writing)

  raw, config_path = openclip_config.read_config(config_name_or_path)
  config = openclip_config.config_from_dict(raw, source=config_path)
  jobs = [(PRETRAINED_NAME, pathlib.Path(pretrained), False)]
  if with_text:
    jobs.append((PRETRAINED_CLIP_NAME, pathlib.Path(pretrained), True))
  reserved = sorted({name for name, _, _ in jobs} & set(finetuned))
  if reserved:
    raise ValueError(f"Task names {reserved} are reserved for the pretrained outputs; rename those files.")
  jobs += [(name, pathlib.Path(path), False) for name, path in finetuned.items()]
  out_dir = pathlib.Path(out_dir)
  existing = [str(out_dir / name) for name, _, _ in jobs if (out_dir / name).exists()]
  if existing:
    raise ValueError(f"Outputs already exist; nothing was written: {existing}.")

  def read(path, text):
    return load_openclip(path, config, text=text, run_pickled_code=run_pickled_code)

  errors = []
  for _, path, text in progress(jobs, "validating"):
    try:
      read(path, text)
    except ValueError as e:  # CheckpointError, StructureError, NonFiniteError
      errors.append(str(e))
  if errors:
    raise ValueError(
      f"{len(errors)} of {len(jobs)} inputs are invalid; nothing was written to {out_dir}:\n"
      + "\n".join(errors)
    )
  written = []
  for name, path, text in progress(jobs, "converting"):
    converted.save(out_dir / name, config_file=converted.OPENCLIP_CONFIG, config=raw, tree=read(path, text))
    written.append(out_dir / name)
  return written
