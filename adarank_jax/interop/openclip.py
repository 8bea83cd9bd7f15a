"""OpenCLIP state dicts <-> CLIP param trees of `adarank_jax.models.clip`.

The mapping is one declarative name table from a tree path (relative to a tower) to the OpenCLIP key, plus
a transform hook per entry: a fixed axis permutation (Linear weights (out, in) -> kernels (in, out); conv
OIHW -> HWIO). Both directions use the same table, so state dict -> tree -> state dict is bit-identical
(values and dtypes; trees keep the stored dtype).

  visual.conv1.weight (768, 3, 32, 32)                  <-> visual/conv1/kernel (32, 32, 3, 768)
  visual.transformer.resblocks.0.attn.in_proj_weight    <-> visual/transformer/resblocks/0/attn/in_proj/kernel
  visual.ln_pre.weight                                  <-> visual/ln_pre/scale
  token_embedding.weight                                <-> text/token_embedding/embedding
  transformer.resblocks.0.mlp.c_fc.weight               <-> text/transformer/resblocks/0/mlp/c_fc/kernel
  logit_scale                                           <-> logit_scale

The image tower alone (what AdaRank merges) is read from the `visual.*` keys of a CLIP checkpoint (its text
keys are ignored, as are the leftovers in Task Arithmetic's image-encoder checkpoints) or from a
`model.visual.state_dict()` without the prefix. Keys, shapes and finiteness are checked before a tree is
built; errors name the file and the keys. torch is needed only for .pt/.bin files.
"""

import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adarank_jax import tree_util
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.models import clip

VISUAL_PREFIX = "visual."
CHECKPOINT_SUFFIXES = (".safetensors",) + state_dict_lib.TORCH_SUFFIXES
PRETRAINED_NAME = "pretrained"
PRETRAINED_CLIP_NAME = "pretrained_clip"

# Hooks: the axis permutation taking the OpenCLIP tensor to the tree array (None: as is).
_LINEAR = (1, 0)  # (out, in) -> (in, out)
_CONV = (2, 3, 1, 0)  # (out, in, h, w) -> (h, w, in, out)

# Tower-relative tree path (regex, first full match wins) -> OpenCLIP key template ('/' become '.'), hook.
NAME_TABLE = (
  (r"conv1/kernel", "conv1.weight", _CONV),
  (r"(.*)/in_proj/kernel", r"\1.in_proj_weight", _LINEAR),  # packed q|k|v
  (r"(.*)/in_proj/bias", r"\1.in_proj_bias", None),
  (r"(.*)/kernel", r"\1.weight", _LINEAR),  # out_proj, c_fc, c_proj
  (r"(.*)/scale", r"\1.weight", None),  # LayerNorm
  (r"(.*)/embedding", r"\1.weight", None),  # token_embedding
  (r".*", r"\g<0>", None),  # biases, class/positional embeddings, proj, text_projection, logit_scale
)
_TABLE = tuple((re.compile(pattern), template, hook) for pattern, template, hook in NAME_TABLE)

# Text-tower and CLIP-head keys, ignored when only the image tower is read from a prefixed checkpoint.
_TEXT_KEYS = re.compile(
  r"token_embedding\.weight|positional_embedding|transformer\..+"
  r"|ln_final\.(weight|bias)|text_projection|logit_scale|logit_bias|attn_mask"
)

Hook = tuple[int, ...] | None


def _tower_key(path: str) -> tuple[str, Hook]:
  for pattern, template, hook in _TABLE:
    if pattern.fullmatch(path):
      return pattern.sub(template, path).replace("/", "."), hook
  raise AssertionError(f"NAME_TABLE ends with a catch-all, yet nothing matched {path!r}")


def _openclip_key(path: str, *, is_clip: bool, prefix: str) -> tuple[str, Hook]:
  """(OpenCLIP key, hook) of a path in a CLIP tree or (with `prefix`) in a VisionTransformer tree."""
  if not is_clip:
    key, hook = _tower_key(path)
    return prefix + key, hook
  tower, _, rest = path.partition("/")
  if tower == "visual":
    key, hook = _tower_key(rest)
    return VISUAL_PREFIX + key, hook
  return _tower_key(rest if tower == "text" else path)  # OpenCLIP keeps the text tower at top level


def _to_tree(array: np.ndarray, hook: Hook) -> np.ndarray:
  array = np.asarray(array)
  return array if hook is None else np.ascontiguousarray(array.transpose(hook))


def _to_openclip(array: Any, hook: Hook) -> np.ndarray:
  array = np.asarray(array)
  return array if hook is None else np.ascontiguousarray(array.transpose(np.argsort(hook)))


def _expected(
  config: clip.VisionConfig | clip.CLIPConfig, *, prefix: str
) -> dict[str, tuple[str, tuple[int, ...], Hook]]:
  """OpenCLIP key -> (tree path, OpenCLIP shape, hook), for every param of `config`'s model."""
  is_clip = isinstance(config, clip.CLIPConfig)
  table = {}
  for path, leaf in tree_util.flatten(clip.abstract_params(config)).items():
    key, hook = _openclip_key(path, is_clip=is_clip, prefix=prefix)
    shape = leaf.shape if hook is None else tuple(leaf.shape[i] for i in np.argsort(hook))
    table[key] = (path, tuple(shape), hook)
  return table


def _expected_dtypes(config: clip.VisionConfig | clip.CLIPConfig, *, prefix: str) -> dict[str, Any]:
  """OpenCLIP key -> the architecture's dtype (float32 for every CLIP param)."""
  is_clip = isinstance(config, clip.CLIPConfig)
  return {
    _openclip_key(path, is_clip=is_clip, prefix=prefix)[0]: leaf.dtype
    for path, leaf in tree_util.flatten(clip.abstract_params(config)).items()
  }


def tree_from_state_dict(
  state_dict: Mapping[str, np.ndarray],
  vision_cfg: clip.VisionConfig,
  text_cfg: clip.TextConfig | None = None,
  *,
  source: str,
) -> dict[str, Any]:
  """Validates an OpenCLIP state dict against the configs, then builds the param tree.

  Args:
    state_dict: OpenCLIP key -> array in torch layouts (as `state_dict.load_state_dict` returns).
    vision_cfg: the image tower's architecture.
    text_cfg: None -> a VisionTransformer tree, from the `visual.*` keys (other CLIP keys are ignored) or,
      when no key has that prefix, from an image-tower state dict. A TextConfig -> a CLIP tree
      ({'visual', 'text', 'logit_scale'}); every CLIP key is then required.
    source: where the state dict came from (the file), named in errors.

  Returns:
    Nested dict of numpy arrays in the tree layouts (kernels (in, out), conv HWIO), dtypes as stored.

  Raises:
    tree_util.StructureError: missing or unexpected keys, or shapes of another architecture (e.g. ViT-B/16
      weights for a ViT-B/32 config), or integer/bool arrays for float weights; all of them are listed.
    tree_util.NonFiniteError: NaN or Inf in a tensor the tree uses.
  """
  if text_cfg is not None:
    config = clip.CLIPConfig(vision=vision_cfg, text=text_cfg)
    expected = _expected(config, prefix="")
    used = dict(state_dict)
  else:
    config = vision_cfg
    prefix = VISUAL_PREFIX if any(k.startswith(VISUAL_PREFIX) for k in state_dict) else ""
    expected = _expected(config, prefix=prefix)
    used = {
      k: v for k, v in state_dict.items() if not prefix or k.startswith(prefix) or not _TEXT_KEYS.fullmatch(k)
    }
  try:
    tree_util.check_structure({key: shape for key, (_, shape, _) in expected.items()}, used, source=source)
  except tree_util.StructureError as e:
    raise tree_util.StructureError(
      f"{e}\n  The checkpoint does not match the expected OpenCLIP architecture {config}."
    ) from None
  state_dict_lib.check_dtypes(
    _expected_dtypes(config, prefix="" if text_cfg is not None else prefix), used, source=source
  )
  tree_util.check_finite(used, source=source)
  return tree_util.unflatten({path: _to_tree(used[key], hook) for key, (path, _, hook) in expected.items()})


def state_dict_from_tree(tree: Mapping[str, Any], *, prefix: str = VISUAL_PREFIX) -> dict[str, np.ndarray]:
  """Inverse of `tree_from_state_dict`: OpenCLIP key -> numpy array (dtypes kept).

  Args:
    tree: a CLIP tree ({'visual', 'text', 'logit_scale'}) or a VisionTransformer tree.
    prefix: key prefix for a VisionTransformer tree: 'visual.' (keys of a full OpenCLIP CLIP, loadable with
      `model.load_state_dict(sd, strict=False)`) or '' (keys of `model.visual`). A CLIP tree always maps to
      the full CLIP layout.
  """
  is_clip = "visual" in tree
  if is_clip and prefix != VISUAL_PREFIX:
    raise ValueError(
      f"prefix={prefix!r} applies to VisionTransformer trees; a CLIP tree always maps to the "
      f"full OpenCLIP layout."
    )
  state = {}
  for path, leaf in tree_util.flatten(tree).items():
    key, hook = _openclip_key(path, is_clip=is_clip, prefix=prefix)
    state[key] = _to_openclip(leaf, hook)
  return state


def load_openclip(
  path: str | os.PathLike,
  config_name_or_path: str | os.PathLike,
  *,
  text: bool = False,
  run_pickled_code: bool = False,
) -> dict[str, Any]:
  """Reads an OpenCLIP checkpoint file, or a tree converted by `convert_checkpoints`, into a param tree.

  Args:
    path: .safetensors / .pt / .pth / .bin / .ckpt. Wrappers ({'state_dict': ...}) and 'module.'/'model.'
      prefixes are handled by `state_dict.load_state_dict`. A directory is a converted Orbax tree
      (`python -m convert.openclip` output: <out>/<task>, <out>/pretrained, <out>/pretrained_clip), checked
      against the config like a file.
    config_name_or_path: OpenCLIP model config name ('ViT-B-32') or JSON path.
    text: False -> VisionTransformer tree (the image tower); True -> CLIP tree (needs the text tower).
    run_pickled_code: allow files that pickle whole modules (runs code from the file: trusted files only).
  """
  config = clip.load_config(config_name_or_path)
  if os.path.isdir(path):
    return _load_converted(path, config, text=text)
  state = state_dict_lib.load_state_dict(path, run_pickled_code=run_pickled_code)
  return tree_from_state_dict(state, config.vision, config.text if text else None, source=os.fspath(path))


def _load_converted(path: str | os.PathLike, config: clip.CLIPConfig, *, text: bool) -> dict[str, Any]:
  """A converted tree directory, validated against `config` (keys, shapes, finiteness)."""
  from adarank_jax import checkpoint  # pylint: disable=g-import-not-at-top

  source = os.fspath(path)
  tree = checkpoint.load_tree(path)
  if text and "visual" not in tree:
    raise tree_util.StructureError(
      f"{source}: an image tower alone; the pretrained model needs the text tower too (convert it with "
      f"--with-text and use <out>/pretrained_clip)"
    )
  if not text and "visual" in tree:
    tree = tree["visual"]
  expected = clip.abstract_params(config if text else config.vision)
  flat = tree_util.flatten(tree)
  expected_flat = tree_util.flatten(expected)
  tree_util.check_structure(tree_util.shapes(expected_flat), flat, source=source)
  state_dict_lib.check_dtypes({k: v.dtype for k, v in expected_flat.items()}, flat, source=source)
  tree_util.check_finite(flat, source=source)
  return tree


def export_openclip(tree: Mapping[str, Any], path: str | os.PathLike, *, prefix: str = VISUAL_PREFIX) -> None:
  """Writes `tree` as an OpenCLIP state dict to a .safetensors or .pt file, atomically.

  See `state_dict_from_tree` for `prefix`. The tree is not checked against a config.
  """
  state_dict_lib.save_state_dict(state_dict_from_tree(tree, prefix=prefix), path)


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
  """Converts one pretrained and many fine-tuned OpenCLIP checkpoints into tree directories.

  Every input is read and validated first; if any is bad, nothing is written and one ValueError lists all
  the problems. Then each image tower is saved with `checkpoint.save_tree` as out_dir/<task name>, the
  pretrained one as out_dir/pretrained (and with `with_text` its full CLIP as out_dir/pretrained_clip).

  Args:
    config_name_or_path: OpenCLIP model config name or JSON path.
    pretrained: the pretrained checkpoint file.
    finetuned: task name -> fine-tuned checkpoint file, e.g. from `find_checkpoints`.
    out_dir: output folder; none of the outputs may exist yet.
    with_text: also store the pretrained CLIP with its text tower.
    run_pickled_code: allow checkpoints that pickle whole modules.
    progress: wraps each pass's iterable with a description ('validating', 'converting'), e.g. tqdm.

  Returns:
    The tree directories written.
  """
  from adarank_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax only when writing)

  clip.load_config(config_name_or_path)  # A bad config fails before any checkpoint is read.
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
    return load_openclip(path, config_name_or_path, text=text, run_pickled_code=run_pickled_code)

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
    checkpoint.save_tree(out_dir / name, read(path, text))
    written.append(out_dir / name)
  return written
