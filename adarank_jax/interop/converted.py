"""The one on-disk form of a converted model (python -m convert.openclip / convert.hf output).

  <dir>/open_clip_config.json  or  <dir>/config.json   the model's original config, unchanged
  <dir>/params/                                          the param tree (checkpoint.save_tree: Orbax +
                                                         checksum.json, verified when read)

The config file's name says the format: an OpenCLIP model-config JSON or a Hugging Face config.json.
`save` builds the directory aside and renames it into place (files.replace_dir); `load` reads it back,
and the format's loader (`openclip.load_openclip`, `hf.load_hf`) checks the tree against the config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adarank_jax.interop import state_dict as state_dict_lib
from adarank_jax.storage import checkpoint, files

PARAMS = "params"
OPENCLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
CONFIG_FILES = (OPENCLIP_CONFIG, HF_CONFIG)


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted model as read: which config file it has, that file's dict, and the tree."""

  config_file: str  # one of CONFIG_FILES
  config: dict[str, Any]
  tree: dict[str, Any]


def is_converted(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory with params/ (a converted model, or an attempt at one)."""
  return (Path(path) / PARAMS).is_dir()


def save(
  directory: str | os.PathLike, *, config_file: str, config: Mapping[str, Any], tree: Mapping[str, Any]
) -> None:
  """Writes directory/<config_file> (`config` as JSON) and directory/params; `directory` must not exist."""
  if config_file not in CONFIG_FILES:
    raise ValueError(f"config_file {config_file!r} is not one of {CONFIG_FILES}")
  directory = Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory}: already exists; refusing to overwrite a converted model")

  def fill(tmp: Path) -> None:
    tmp.mkdir()
    files.write_json(tmp / config_file, dict(config), indent=2)
    checkpoint.save_tree(tmp / PARAMS, dict(tree))

  files.replace_dir(directory, fill)


def read_config(directory: str | os.PathLike, config_file: str) -> dict[str, Any]:
  """The JSON dict of directory/config_file; CheckpointError naming the file if absent or unreadable."""
  path = Path(directory) / config_file
  if not path.is_file():
    raise state_dict_lib.CheckpointError(f"{directory}: no {config_file}")
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise state_dict_lib.CheckpointError(f"{path}: unreadable config: {e}") from e


def load(directory: str | os.PathLike) -> Converted:
  """Reads a directory written by `save`.

  Raises:
    state_dict.CheckpointError: not a converted model (no params/, or not exactly one config file), or an
      unreadable config.
    checkpoint.CorruptCheckpointError: the tree's bytes changed after it was written.
  """
  directory = Path(directory)
  found = [name for name in CONFIG_FILES if (directory / name).is_file()]
  if not is_converted(directory) or len(found) != 1:
    raise state_dict_lib.CheckpointError(
      f"{directory}: not a converted model directory (expected {PARAMS}/ and one of {', '.join(CONFIG_FILES)})"
    )
  config = read_config(directory, found[0])
  return Converted(found[0], config, checkpoint.load_tree(directory / PARAMS))
