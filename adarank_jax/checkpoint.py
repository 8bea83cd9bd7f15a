"""Orbax storage of param trees and training state. The only module that imports orbax.

Orbax writes into a temporary directory and renames it when complete, so a killed write leaves no
half checkpoint behind: a directory either holds a whole tree or is absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from adarank_jax import files
from adarank_jax import tree_util


def _restored(tree: Any) -> Any:
  """Orbax restores dict keys as strings and leaves as jax arrays; give back ints and numpy."""
  return tree_util.unflatten({k: np.asarray(v) for k, v in tree_util.flatten(tree).items()})


def save_tree(path: str | os.PathLike, tree: Any) -> None:
  """Saves a param tree (nested dict of arrays) to the directory `path`, which must not exist yet."""
  path = Path(path).absolute()
  if path.exists():
    raise FileExistsError(f"{path}: already exists; refusing to overwrite a saved tree")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def replace_tree(path: str | os.PathLike, tree: Any) -> None:
  """Saves `tree` to the directory `path`, replacing what is there: the new tree is written aside and
  renamed into place (files.replace_dir), so `path` holds the old tree or the new one, never a mix."""
  files.replace_dir(Path(path).absolute(), lambda tmp: save_tree(tmp, tree))


def load_tree(path: str | os.PathLike, target: Any = None) -> Any:
  """Restores a tree saved by `save_tree`; `target` (arrays or ShapeDtypeStructs) fixes structure/dtypes."""
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no saved tree here")
  with ocp.StandardCheckpointer() as checkpointer:
    if target is None:
      return _restored(checkpointer.restore(path))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return checkpointer.restore(path, abstract)


class Manager:
  """Numbered checkpoints of a training state under one directory, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, tree: Any) -> None:
    """Saves `tree` as checkpoint `step` and waits until it is complete on disk."""
    self._manager.save(step, args=ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int, target: Any) -> Any:
    """Restores checkpoint `step` into the structure, dtypes (and shardings) of `target`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._manager.close()
