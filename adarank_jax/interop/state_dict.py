"""PyTorch-style state dicts on disk: read and write them as {name: numpy array}, atomically.

Formats: `.safetensors` (read without torch), and torch pickles `.pt`/`.pth`/`.bin`/`.ckpt`, read with
`torch.load(weights_only=True)`. A checkpoint that pickles a whole `nn.Module` (the original Task
Arithmetic checkpoints do) runs arbitrary code when loaded, so it loads only with
`run_pickled_code=True`. bfloat16 tensors become `ml_dtypes.bfloat16` arrays, so nothing is rounded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from adarank_jax.storage import files

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "module")
PREFIXES = ("module.", "model.")


# How each entry point turns on run_pickled_code; the refusal names all of them.
PICKLED_CODE_SWITCHES = (
  "--config.model.run_pickled_code=true (python -m adarank_jax.main), "
  "--run-pickled-code (python -m convert.openclip) or run_pickled_code=True (Python)"
)


class CheckpointError(ValueError):
  """A checkpoint file can't be read, or holds something other than a state dict."""


def load_state_dict(path: str | os.PathLike, *, run_pickled_code: bool = False) -> dict[str, np.ndarray]:
  """Reads a state dict, unwrapping {'state_dict': ...}-style wrappers and 'module.'/'model.' prefixes."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file")
  if path.suffix == ".safetensors":
    state = _load_safetensors(path)
  elif path.suffix in TORCH_SUFFIXES:
    state = _load_torch(path, run_pickled_code=run_pickled_code)
  else:
    raise CheckpointError(
      f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or one of "
      f"{', '.join(TORCH_SUFFIXES)}"
    )
  return _strip_prefixes(state)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  try:
    with safe_open(str(path), framework="numpy") as f:
      return {key: f.get_tensor(key) for key in f.keys()}
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e


def _load_torch(path: Path, *, run_pickled_code: bool) -> dict[str, np.ndarray]:
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top

  # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol 2+ starts with 0x80).
  # Anything else is not a checkpoint; torch.load would fail on it with e.g. "IndexError: pop from
  # empty list".
  with open(path, "rb") as f:
    head = f.read(1)
  if not zipfile.is_zipfile(path) and head != b"\x80":
    raise CheckpointError(
      f"{path}: unreadable torch checkpoint: not a PyTorch/safetensors checkpoint "
      f"(neither a torch.save archive nor a safetensors file)"
    )
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not run_pickled_code)
  except pickle.UnpicklingError as e:
    if "Unsupported global" not in str(e):
      raise CheckpointError(f"{path}: unreadable torch checkpoint: {_first_line(e)}") from e
    raise CheckpointError(
      f"{path}: this file is not a plain state dict (it pickles Python objects, e.g. a whole "
      f"nn.Module). Loading it runs code from the file; if you trust it, allow it with "
      f"{PICKLED_CODE_SWITCHES}. Detail: {_first_line(e)}"
    ) from e
  except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... on corrupt files.
    raise CheckpointError(f"{path}: unreadable torch checkpoint: {type(e).__name__}: {e}") from e
  if isinstance(obj, torch.nn.Module):
    obj = obj.state_dict()
  while isinstance(obj, Mapping) and not _is_tensor_dict(obj, torch):
    inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, torch.nn.Module))]
    if not inner:
      bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
      raise CheckpointError(
        f"{path}: not a state dict: entries {', '.join(bad[:10])} are not tensors and none of "
        f"{', '.join(WRAPPER_KEYS)} wraps one"
      )
    obj = obj[inner[0]]
    if isinstance(obj, torch.nn.Module):
      obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
  return {str(k): _to_numpy(v) for k, v in obj.items()}


def _first_line(error: Exception) -> str:
  lines = [line for line in str(error).splitlines() if "Unsupported" in line]
  return (lines or str(error).splitlines() or [type(error).__name__])[0]


def _is_tensor_dict(obj: Mapping, torch) -> bool:
  return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  stripped = True
  while stripped and state:
    stripped = False
    for prefix in PREFIXES:
      if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
        stripped = True
  return state


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes `state_dict` to `path` (.safetensors or a torch suffix) atomically: a reader never sees half."""
  path = Path(path)
  if path.suffix not in (".safetensors",) + TORCH_SUFFIXES:
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}")
  arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # keeps 0-d arrays 0-d

  def write(tmp: str) -> None:
    if path.suffix == ".safetensors":
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

      save_file(arrays, tmp, metadata={"format": "pt"})
    else:
      import torch  # pylint: disable=g-import-not-at-top

      torch.save({k: _to_torch(v) for k, v in arrays.items()}, tmp)

  files.write_atomic(path, write)


def _to_torch(array: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top

  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def is_floating(dtype) -> bool:
  """numpy's floating dtypes and ml_dtypes' (bfloat16, float8_*), whose numpy kind is 'V'."""
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.floating) or (dtype.kind == "V" and "float" in dtype.name)


def check_dtypes(expected: Mapping[str, object], actual: Mapping[str, object], *, source: str) -> None:
  """Raises tree_util.StructureError naming `source` and every key whose kind of dtype differs from the
  architecture's: integer or bool arrays where it has floating-point weights (any float width is fine:
  float16/bfloat16/float32/float64), or floats where it has integer buffers.

  Args:
    expected: key -> the architecture's dtype (keys missing from `actual` are check_structure's business).
    actual: key -> array.
    source: the file or directory, named in the error.
  """
  from adarank_jax.core import tree_util

  bad = []
  for key in sorted(set(expected) & set(actual)):
    want_float = is_floating(expected[key])
    got = np.asarray(actual[key]).dtype
    if is_floating(got) != want_float:
      bad.append(
        f"{key}: dtype {got.name}, expected a {'floating-point' if want_float else 'integer'} "
        f"dtype (the architecture's is {np.dtype(expected[key]).name})"
      )
  if bad:
    raise tree_util.StructureError(f"{source}: dtype mismatches ({len(bad)}): " + "; ".join(bad))


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_hf_directory(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, state dict) of a Hugging Face model directory, sharded or not."""
  directory = Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise CheckpointError(f"{directory}: not a Hugging Face model directory (no config.json)")
  try:
    config = json.loads(config_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: unreadable config: {e}") from e
  for name in HF_WEIGHT_FILES:
    if (directory / name).is_file():
      return config, load_state_dict(directory / name)
    index = directory / f"{name}.index.json"
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: unreadable shard index: {e}") from e
      state = {}
      for shard in shards:
        state.update(load_state_dict(directory / shard))
      return config, state
  raise CheckpointError(
    f"{directory}: no weights found; expected one of {', '.join(HF_WEIGHT_FILES)} (or a sharded *.index.json)"
  )


def save_hf_directory(
  config: Mapping, state_dict: Mapping[str, np.ndarray], directory: str | os.PathLike
) -> None:
  """Writes config.json + model.safetensors into `directory` atomically (built aside, then renamed)."""

  def fill(tmp: Path) -> None:
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    save_state_dict(state_dict, tmp / "model.safetensors")

  files.replace_dir(directory, fill)
