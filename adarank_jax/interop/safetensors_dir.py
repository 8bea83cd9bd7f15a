"""Hugging Face decoder directories of safetensors files, read and written one tensor at a time.

  <dir>/config.json
  <dir>/model.safetensors                    one file, or shards named by an index:
  <dir>/model.safetensors.index.json         {"metadata": {"total_size": bytes}, "weight_map": {key: shard}}
  <dir>/model-00001-of-0000N.safetensors, ...

`open_dir` reads config.json and the safetensors headers, never tensor data, and checks what they say
against the architecture config.json describes, every problem at once, each naming the file, the key and
what was expected: a shard the index names that does not exist, a key the index places in a shard that
lacks it, missing and unexpected keys, shapes that differ from the config's, integer tensors where the
architecture has float weights. `check_finite` then reads every tensor once (one at a time) for NaN/Inf,
and `check_same_architecture` compares two directories' configs (model_type, hidden_size, ...) and trees.
So a bad input fails before anything is computed from it.

`ModelDir.read` gives one leaf of the param tree (the `hf.DECODER` key map: kernels (in, out), C order,
the stored dtype), memory-mapping its shard (safetensors' `safe_open`, numpy framework) only while that
tensor is copied out: the mapping is closed before `read` returns, so the pages of a directory that stay
resident are those of the leaves the caller keeps.

`save_sharded` writes a param tree back as such a directory, split into shards of at most
`max_shard_size` bytes in tree order (transformers' `save_pretrained` rule: a tensor larger than that gets a
shard of its own; one shard is written as model.safetensors without an index). The directory is built aside
and renamed into place (`files.replace_dir`), every file in it written with `files.write_atomic`, and
transformers' `from_pretrained` loads it.

Decoders only (model_type llama, mistral, qwen2; `models.decoder`); the other families are read whole by
`hf.load_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adarank_jax.core import tree_util
from adarank_jax.interop import converted, hf, keymap
from adarank_jax.interop import hf_config as config_lib
from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.models import decoder
from adarank_jax.storage import files

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})

CheckpointError = state_dict_lib.CheckpointError


@dataclasses.dataclass(frozen=True)
class ModelDir:
  """An opened, checked HF decoder directory (see `open_dir`); tensors are read on demand.

  Attributes:
    directory: the model directory.
    hf_config: its config.json, as written.
    config: the DecoderConfig parsed from it.
    abstract: flat tree path -> abstract leaf (shape, dtype), in tree order.
    plan: flat tree path -> (key-map hook, the HF keys the leaf is made from).
    files: HF key -> the safetensors file that holds it.
  """

  directory: Path
  hf_config: dict[str, Any]
  config: decoder.DecoderConfig
  abstract: dict[str, Any]
  plan: dict[str, tuple[keymap.Hook, tuple[str, ...]]]
  files: dict[str, Path]

  @property
  def config_file(self) -> Path:
    return self.directory / converted.HF_CONFIG

  def read(self, path: str, *, check_finite: bool = True) -> np.ndarray:
    """The tree leaf at flat `path`, read from its shard(s): C order, the stored dtype.

    Raises:
      tree_util.NonFiniteError: (with `check_finite`) NaN or Inf in the tensor, naming its file and key.
      state_dict.CheckpointError: the tensor's bytes can't be read.
    """
    hook, keys = self.plan[path]
    tensors = []
    for key in keys:
      tensor = _read_tensor(self.files[key], key)
      if check_finite and not _is_finite(tensor):
        raise tree_util.NonFiniteError(
          f"{self.files[key]}: {key}: NaN or Inf values (expected finite weights)"
        )
      tensors.append(tensor)
    return np.asarray(hook.to_tree(*tensors), order="C")

  def read_tree(self, *, check_finite: bool = True) -> dict[str, Any]:
    """The whole param tree (nested dicts of numpy arrays), read leaf by leaf."""
    return tree_util.unflatten({path: self.read(path, check_finite=check_finite) for path in self.abstract})


def _read_tensor(file: Path, key: str) -> np.ndarray:
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  try:
    with safe_open(str(file), framework="numpy") as f:  # maps the file; closing unmaps it
      return f.get_tensor(key)  # a copy
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{file}: {key}: unreadable tensor: {e}") from e


def _is_finite(array: np.ndarray) -> bool:
  if not state_dict_lib.is_floating(array.dtype):
    return True
  if array.dtype.itemsize < 4:  # bfloat16, float16, float8: np.isfinite needs a numpy float
    array = array.astype(np.float32)
  return bool(np.isfinite(array).all())


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
  """Key -> (shape, safetensors dtype name such as 'F32') of one file, from its header alone."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  try:
    with safe_open(str(file), framework="numpy") as f:
      return {
        key: (tuple(f.get_slice(key).get_shape()), str(f.get_slice(key).get_dtype())) for key in f.keys()
      }
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{file}: unreadable safetensors file: {e}") from e


def _is_float_name(dtype: str) -> bool:
  return dtype.upper().startswith(("F", "BF"))  # F64, F32, F16, BF16, F8_E4M3, ...


def _key_files(directory: Path) -> dict[str, Path]:
  """HF key -> file, from the index or the one weights file; checks that every shard has its keys."""
  single, index = directory / WEIGHTS, directory / INDEX
  if single.is_file():  # transformers' order: the one file first
    return dict.fromkeys(_header(single), single)
  if not index.is_file():
    raise CheckpointError(f"{directory}: no weights: expected {WEIGHTS} or {INDEX} (safetensors shards)")
  try:
    weight_map = files.read_json(index)["weight_map"]
    if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
      raise TypeError("weight_map is not an object of key -> shard file name")
  except (files.CorruptFileError, OSError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index}: unreadable shard index: {type(e).__name__}: {e}") from e
  by_shard: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    by_shard.setdefault(shard, []).append(key)
  absent = [
    f"{directory / shard} (holds {len(keys)} keys, e.g. {keys[0]})"
    for shard, keys in by_shard.items()
    if not (directory / shard).is_file()
  ]
  if absent:
    raise CheckpointError(f"{index}: shard files it names do not exist: {'; '.join(absent)}")
  lacking = []
  for shard, keys in by_shard.items():
    held = _header(directory / shard)
    lacking += [f"{directory / shard} lacks {key}" for key in keys if key not in held]
  if lacking:
    raise tree_util.StructureError(
      f"{index}: keys placed in shards that do not hold them ({len(lacking)}): {'; '.join(lacking)}"
    )
  return {key: directory / shard for key, shard in weight_map.items()}


def open_dir(directory: str | os.PathLike) -> ModelDir:
  """Opens a decoder directory and checks its headers against its config.json; reads no tensor data.

  Raises:
    state_dict.CheckpointError: no directory, config.json or weights; an unreadable index or file; a
      shard file the index names that does not exist.
    ValueError: config.json is not a supported decoder config (names the file).
    tree_util.StructureError: a key the index places in a shard that lacks it; missing, unexpected or
      mis-shaped keys, or integer tensors where the config has float weights (every one, each with its
      file and the expected shape).
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such model directory")
  hf_config = converted.read_config(directory, converted.HF_CONFIG)
  config_file = directory / converted.HF_CONFIG
  config = config_lib.model_config(hf_config, source=str(config_file))
  if not isinstance(config, decoder.DecoderConfig):
    raise ValueError(
      f"{config_file}: model_type {hf_config['model_type']!r}; this reader takes the decoders "
      f"{list(decoder.MODEL_TYPES)}"
    )
  key_files = _key_files(directory)
  abstract, rules, ignored = hf.key_layout(config)
  expected = keymap.expected_keys(rules, abstract, source=str(config_file))
  ignored = re.compile(ignored)
  headers = {file: _header(file) for file in set(key_files.values())}
  found = {key: (file, *headers[file][key]) for key, file in key_files.items() if not ignored.fullmatch(key)}
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(f"{key} (in {found[key][0]})" for key in set(found) - set(expected))
  mismatched, wrong_dtype = [], []
  for key in sorted(set(expected) & set(found)):
    (want_shape, want_dtype), (file, shape, dtype) = expected[key], found[key]
    if shape != tuple(want_shape):
      mismatched.append(f"{file}: {key}: shape {shape}, expected {tuple(want_shape)}")
    if _is_float_name(dtype) != state_dict_lib.is_floating(want_dtype):
      wrong_dtype.append(f"{file}: {key}: dtype {dtype}, expected a floating-point dtype")
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}), in no file of the directory: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
  if wrong_dtype:
    problems.append(f"dtype mismatches ({len(wrong_dtype)}): {'; '.join(wrong_dtype)}")
  if problems:
    raise tree_util.StructureError(
      f"{directory}: " + "\n  ".join(problems) + f"\n  (expected the {config.architecture} layout given by "
      f"{config_file})"
    )
  plan = keymap.resolve(rules, abstract, source=str(config_file))
  return ModelDir(directory, hf_config, config, dict(abstract), plan, key_files)


def check_finite(model: ModelDir, *, progress: Callable[[Any], Any] = lambda items: items) -> None:
  """Reads every tensor the tree uses, one at a time; NonFiniteError naming each file and key with NaN/Inf.

  Args:
    model: from `open_dir`.
    progress: wraps the iteration over the tensors (e.g. tqdm.tqdm).
  """
  keys = [key for _, keys in model.plan.values() for key in keys]
  bad = [
    f"{model.files[key]}: {key}"
    for key in progress(keys)
    if not _is_finite(_read_tensor(model.files[key], key))
  ]
  if bad:
    raise tree_util.NonFiniteError(
      f"{model.directory}: NaN or Inf values (expected finite weights) in {len(bad)} tensors: {'; '.join(bad)}"
    )


def check_same_architecture(reference: ModelDir, model: ModelDir) -> None:
  """Raises StructureError unless `model` has `reference`'s architecture: the same config fields (heads
  included: the same architecture, num_labels and tie_word_embeddings) and so the same tree paths and shapes.
  The message names both config.json files and every differing field."""
  source, reference_source = str(model.config_file), str(reference.config_file)
  shapes = lambda m: {path: tuple(leaf.shape) for path, leaf in m.abstract.items()}
  diffs = [
    f"{f.name}={getattr(model.config, f.name)!r} (reference: {getattr(reference.config, f.name)!r})"
    for f in dataclasses.fields(model.config)
    if f.name != "dtype" and getattr(model.config, f.name) != getattr(reference.config, f.name)
  ]
  if diffs or shapes(model) != shapes(reference):
    raise tree_util.StructureError(
      f"{source}: architecture differs from {reference_source}: {'; '.join(diffs) or 'param trees differ'}"
    )


def is_decoder_dir(directory: str | os.PathLike) -> bool:
  """Whether `directory` is an HF directory (not a converted one) whose config.json names a decoder's
  model_type: what `load` reads. False for anything else, unreadable config.json included (the other
  readers name that problem)."""
  path = Path(directory) / converted.HF_CONFIG
  if converted.is_converted(directory) or not path.is_file():
    return False
  try:
    model_type = json.loads(path.read_text()).get("model_type")
  except (OSError, ValueError, AttributeError):
    return False
  return model_type in decoder.MODEL_TYPES


def load(directory: str | os.PathLike) -> tuple[decoder.DecoderConfig, dict[str, Any]]:
  """(config, param tree) of a decoder directory: `open_dir`'s checks, then every leaf read (one tensor
  at a time) and checked for NaN/Inf before the tree is returned."""
  model = open_dir(directory)
  return model.config, model.read_tree()


def parse_size(size: int | str) -> int:
  """Bytes of `size`: an int, or transformers' strings: '500MB' (10**6), '2GiB' (2**30), '40KB', ..."""
  if isinstance(size, int) and not isinstance(size, bool):
    value = size
  else:
    match = _SIZE.fullmatch(str(size))
    if not match:
      raise ValueError(f"max_shard_size={size!r}: expected bytes (int) or a size such as '2GB' or '500MiB'")
    value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
  if value < 1:
    raise ValueError(f"max_shard_size={size!r}: expected a positive size")
  return value


def _stored_dtype(hf_config: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
  """config.json with 'dtype' naming the weights' float dtype when they share one (transformers 5 loads
  the weights in that dtype)."""
  names = {np.asarray(v).dtype.name for v in flat.values() if state_dict_lib.is_floating(np.asarray(v).dtype)}
  if len(names) != 1:
    return dict(hf_config)
  out = {**hf_config, "dtype": names.pop()}
  if out.get("torch_dtype") is not None:
    out["torch_dtype"] = out["dtype"]
  return out


def save_sharded(
  tree: Mapping[str, Any],
  hf_config: Mapping[str, Any],
  directory: str | os.PathLike,
  *,
  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
  """Writes a decoder's param tree as an HF directory that transformers' `from_pretrained` loads.

  The tree is checked against `hf_config` (paths, shapes, dtypes, NaN/Inf) before anything is written. Each
  shard's tensors are converted to the HF layout (torch Linear weights (out, in)) only while it is written.

  Args:
    tree: param tree (numpy or jax arrays) of the decoder `hf_config` describes, e.g. a merged model.
    hf_config: the config.json dict the tree was read with (`ModelDir.hf_config`); written unchanged but
      for 'dtype' (and a set 'torch_dtype'), which name the stored float dtype when the weights share one.
    directory: the output directory; replaced if it exists.
    max_shard_size: the most bytes of tensors per shard: an int or a string such as '2GB' or '500MiB'.

  Returns:
    The names of the weight files written, in order.

  Raises:
    ValueError: `hf_config` is not a decoder config, or a bad `max_shard_size`.
    tree_util.StructureError, tree_util.NonFiniteError: the tree does not fit the config.
  """
  limit = parse_size(max_shard_size)
  config = config_lib.model_config(hf_config)
  if not isinstance(config, decoder.DecoderConfig):
    raise ValueError(f"save_sharded: model_type {hf_config['model_type']!r} is not a decoder's")
  abstract, rules, _ = hf.key_layout(config)
  flat = tree_util.flatten(tree)
  keymap.check_tree(abstract, flat, source="save_sharded: the tree")
  plan = keymap.resolve(rules, list(abstract), source="save_sharded")
  shards: list[list[str]] = []
  size = 0
  for path in plan:
    leaf = flat[path]
    nbytes = int(np.prod(np.shape(leaf))) * np.asarray(leaf).dtype.itemsize
    if not shards or (size + nbytes > limit and size > 0):
      shards.append([])
      size = 0
    shards[-1].append(path)
    size += nbytes
  total = len(shards)
  names = (
    [WEIGHTS] if total == 1 else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
  )
  config_json = _stored_dtype(config_lib.export_config(hf_config), flat)

  def fill(tmp: Path) -> None:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    tmp.mkdir()
    files.write_json(tmp / converted.HF_CONFIG, config_json, indent=2, sort_keys=True)
    weight_map, total_size, total_parameters = {}, 0, 0
    for name, paths in zip(names, shards, strict=True):
      tensors = {}
      for path in paths:
        hook, keys = plan[path]
        for key, value in zip(keys, hook.to_external(np.asarray(flat[path])), strict=True):
          tensors[key] = np.asarray(value, order="C")
          weight_map[key] = name
          total_size += tensors[key].nbytes
          total_parameters += tensors[key].size
      files.write_atomic(tmp / name, lambda out, t=tensors: save_file(t, out, metadata={"format": "pt"}))
      del tensors
    if total > 1:
      index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
      }
      files.write_json(tmp / INDEX, index, indent=2)

  files.replace_dir(directory, fill)
  return names
