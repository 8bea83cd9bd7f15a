"""Orbax storage of param trees and training state. The only module that imports orbax.

Orbax writes into a temporary directory and renames it when complete, so a killed write leaves no
half checkpoint behind: a directory either holds a whole tree or is absent.

Every saved tree also carries `checksum.json` (CHECKSUM_NAME): the sha256 of each leaf's bytes, dtype
and shape, computed from the arrays given to save. Restoring recomputes it from the arrays read back,
so a flipped byte in a stored file (which Orbax's compressed chunks may decode without complaint into
other numbers) raises CorruptCheckpointError naming the directory and the leaf. `Manager.restore` of
the newest step falls back to the newest older step that verifies, with a warning naming both.
Trees written before checksums existed (no checksum.json) restore unverified.

When Orbax gives up on a step (a truncated or damaged data file), the reads it had started go on in
TensorStore's threads and each one, finishing, hands its result to Orbax's event loop, closed by then:
Python reports every such `RuntimeError: Event loop is closed` as an unraisable exception or, from
TensorStore's own threads, through `sys.excepthook`, and asyncio logs the abandoned read tasks. From the
first restore on (a late read can report before Orbax's own error reaches the caller), `_late_reads`
counts these reports instead and logs them at DEBUG on this module's logger (with the full reader
error), so the user sees the one warning line per corrupt step and `--verbose` (which enables DEBUG
for adarank_jax's loggers) the detail. A `Manager` step also holds a small JSON dict beside the tree
(`Manager.save(..., data=...)`): the input pipeline's iterator state, so a resumed run reads exactly the
batches the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from adarank_jax.core import tree_util
from adarank_jax.storage import files

CHECKSUM_NAME = "checksum.json"
_CHECKSUM_FORMAT = "sha256 per leaf of dtype, shape and bytes, v1"
# A Manager step holds two items, the tree and a JSON dict of the input pipeline's state, beside the
# tree's checksum.json.
_STATE, _DATA = "state", "data"


_log = logging.getLogger(__name__)


class _LateReads:
  """Counts and logs at DEBUG the reports of reads a failed restore left in flight (module docstring).

  `install` (before the first restore, once per process) chains itself before `sys.unraisablehook` and
  `sys.excepthook` (TensorStore's threads print a callback's error through the latter) and filters the
  `asyncio` logger; every other report passes on unchanged.
  """

  CLOSED = "Event loop is closed"
  ABANDONED = "Task exception was never retrieved"

  def __init__(self) -> None:
    self.count = 0
    self._unraisable: Any = None
    self._except: Any = None

  def install(self) -> None:
    if self._unraisable is None:
      self._unraisable, self._except = sys.unraisablehook, sys.excepthook
      sys.unraisablehook, sys.excepthook = self._unraisable_hook, self._except_hook
      logging.getLogger("asyncio").addFilter(self._keep)

  def _unraisable_hook(self, unraisable: Any) -> None:
    if not self._counted(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
      self._unraisable(unraisable)

  def _except_hook(self, exc_type: Any, exc_value: Any, exc_traceback: Any) -> None:
    if not self._counted(exc_type, exc_value, exc_traceback):
      self._except(exc_type, exc_value, exc_traceback)

  def _counted(self, exc_type: Any, exc_value: Any, exc_traceback: Any) -> bool:
    """True for a late read's `RuntimeError: Event loop is closed`, logged (its traceback the first time)."""
    if exc_type is not RuntimeError or str(exc_value) != self.CLOSED:
      return False
    self.count += 1
    first = self.count == 1  # the same traceback every time: shown once, then counted
    _log.debug(
      "late read %d of a failed restore hit the closed event loop%s",
      self.count,
      ":\n" + "".join(traceback.format_exception(exc_type, exc_value, exc_traceback)) if first else "",
    )
    return True

  def _keep(self, record: logging.LogRecord) -> bool:
    if not record.getMessage().startswith(self.ABANDONED):
      return True
    _log.debug("an abandoned checkpoint read: %s", record.getMessage(), exc_info=record.exc_info)
    return False


_late_reads = _LateReads()


class CorruptCheckpointError(ValueError):
  """A saved tree's arrays differ from the checksum recorded when it was written; the message names the
  checkpoint directory and the leaves."""


class IncompatibleCheckpointError(ValueError):
  """A `Manager` step in a layout this version cannot resume from (written by an earlier adarank_jax)."""


def _restored(tree: Any) -> Any:
  """Orbax restores dict keys as strings and leaves as jax arrays; give back ints and numpy."""
  return tree_util.unflatten({k: np.asarray(v) for k, v in tree_util.flatten(tree).items()})


def _dtype(name: str) -> np.dtype:
  return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _write_checksum(directory: Path, tree: Any, *, shared: bool) -> None:
  """shared: a checkpoint all processes write together (process 0 writes its checksum), else a host
  tree of this process."""
  sums = tree_util.checksums(tree)
  if sums is not None and (not shared or jax.process_index() == 0):
    files.write_json(directory / CHECKSUM_NAME, {"format": _CHECKSUM_FORMAT, "leaves": sums}, indent=1)


def verify(directory: str | os.PathLike, tree: Any) -> None:
  """Raises CorruptCheckpointError unless `tree` (restored from `directory`) matches its checksum.json.

  Nothing to check without checksum.json (a tree saved before checksums existed). A leaf restored in
  another dtype than it was saved in is compared after casting back to the saved dtype.
  """
  directory = Path(directory)
  path = directory / CHECKSUM_NAME
  if not path.is_file():
    return
  try:
    recorded = files.read_json(path)["leaves"]
  except (files.CorruptFileError, KeyError, TypeError) as error:
    raise CorruptCheckpointError(f"{directory}: unreadable {CHECKSUM_NAME} ({error})") from error
  actual = tree_util.path_leaves(tree)
  problems = []
  for name in sorted(set(recorded) - set(actual)):
    problems.append(f"{name}: saved but not restored")
  for name in sorted(set(actual) & set(recorded)):
    array = tree_util.host_array(actual[name])
    if array is None:
      continue
    entry = recorded[name]
    if list(array.shape) != list(entry["shape"]):
      problems.append(f"{name}: shape {tuple(array.shape)}, saved {tuple(entry['shape'])}")
      continue
    saved_dtype = _dtype(entry["dtype"])
    if array.dtype != saved_dtype:
      array = np.ascontiguousarray(array.astype(saved_dtype))
    if tree_util.digest(array) != entry["sha256"]:
      problems.append(f"{name}: sha256 differs from the one recorded at save time")
  # Leaves restored but never recorded: a restore target with more leaves than the save; not corruption.
  if problems:
    raise CorruptCheckpointError(
      f"{directory}: checkpoint is corrupt (its bytes changed after it was written): "
      + "; ".join(problems[:10])
      + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    )


@contextlib.contextmanager
def _naming(path: Path, what: str) -> Iterator[None]:
  """Re-raises a failed write (a full disk, a read-only directory: Orbax and TensorStore report them
  as OSError, ValueError or RuntimeError, often without a path) as an OSError naming `path`."""
  try:
    yield
  except (OSError, ValueError, RuntimeError) as error:
    if isinstance(error, OSError) and error.filename:
      raise
    raise OSError(
      getattr(error, "errno", None) or 0,
      f"writing {what} failed ({type(error).__name__}: {str(error)[:300]}); is the disk full or read-only?",
      str(path),
    ) from error


def _this_process() -> ocp.StandardCheckpointer:
  """A checkpointer for a host tree that this process writes or reads on its own (in a run of several
  processes, the others do not take part: no barrier waits for them)."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
    multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  )


def _write_tree(path: Path, tree: Any) -> None:
  with _naming(path, "the tree"), _this_process() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
  _write_checksum(path, tree, shared=False)


def save_tree(path: str | os.PathLike, tree: Any) -> None:
  """Saves a param tree (nested dict of arrays) to the directory `path`, which must not exist yet.

  The tree and its checksum.json are written aside and renamed into place together.
  """
  path = Path(path).absolute()
  if path.exists():
    raise FileExistsError(f"{path}: already exists; refusing to overwrite a saved tree")
  files.replace_dir(path, lambda tmp: _write_tree(tmp, tree))


def replace_tree(path: str | os.PathLike, tree: Any) -> None:
  """Saves `tree` to the directory `path`, replacing what is there: the new tree is written aside and
  renamed into place (files.replace_dir), so `path` holds the old tree or the new one, never a mix."""
  files.replace_dir(Path(path).absolute(), lambda tmp: _write_tree(tmp, tree))


def load_tree(path: str | os.PathLike, target: Any = None) -> Any:
  """Restores a tree saved by `save_tree`; `target` (arrays or ShapeDtypeStructs) fixes structure/dtypes.

  Raises:
    CorruptCheckpointError: the arrays read differ from the checksum recorded when it was saved.
  """
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no saved tree here")
  with _this_process() as checkpointer:
    if target is None:
      tree = _restored(checkpointer.restore(path))
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      tree = checkpointer.restore(path, abstract)
  verify(path, tree)
  return tree


class Manager:
  """Numbered checkpoints of a training state under one directory, keeping the newest `max_to_keep`.

  Each step directory holds checksum.json (see the module docstring), verified by `restore`.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )

  def step_directory(self, step: int) -> Path:
    """Where checkpoint `step` lives."""
    return self.directory / str(step)

  def save(self, step: int, tree: Any, *, data: Mapping[str, Any] | None = None) -> None:
    """Saves `tree` as checkpoint `step`, with its checksum, and waits until it is complete on disk.

    `data`: a JSON-able dict saved beside the tree in the same step (the input pipeline's iterator
    state), read back by `data`.
    """
    items = {_STATE: ocp.args.StandardSave(tree), _DATA: ocp.args.JsonSave(dict(data or {}))}
    with _naming(self.step_directory(step), f"checkpoint step {step}"):
      self._manager.save(step, args=ocp.args.Composite(**items))
      self._manager.wait_until_finished()
      _write_checksum(self.step_directory(step), tree, shared=True)

  def data(self, step: int) -> dict[str, Any]:
    """The JSON dict saved with checkpoint `step` (empty if none was given).

    Raises:
      CorruptCheckpointError: it cannot be read.
      IncompatibleCheckpointError: the step was written by an earlier adarank_jax.
    """
    self._check_layout(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{_DATA: ocp.args.JsonRestore()}))
    except (ValueError, OSError, KeyError) as error:
      raise CorruptCheckpointError(
        f"{self.step_directory(step) / _DATA}: the data state cannot be read ({type(error).__name__}: "
        f"{str(error)[:300]})"
      ) from error
    return dict(restored[_DATA])

  def _check_layout(self, step: int) -> None:
    """Refuses a step written before the pipeline state was saved beside the tree (one 'default' item)."""
    directory = self.step_directory(step)
    if (directory / "default").is_dir() and not (directory / _STATE).exists():
      raise IncompatibleCheckpointError(
        f"{directory}: written by an earlier adarank_jax, which saved the training state alone (in "
        f"'default/'); this version saves the input pipeline's position beside it ('{_STATE}/', "
        f"'{_DATA}/') and cannot resume that run exactly. Delete {self.directory} to start the run "
        "over, or finish it with the version that wrote it."
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _restore_verified(self, step: int, target: Any) -> Any:
    self._check_layout(step)
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    _late_reads.install()  # before the read: its late reports may come before its error
    try:
      tree = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
      )[_STATE]
    except (ValueError, OSError, KeyError) as error:  # e.g. a truncated _METADATA or a missing file
      _log.debug("reading %s failed:", self.step_directory(step), exc_info=error)
      first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
      raise CorruptCheckpointError(
        f"{self.step_directory(step)}: checkpoint cannot be read, truncated or corrupt "
        f"({type(error).__name__}: {first_line[:300]})"
      ) from error
    verify(self.step_directory(step), tree)
    return tree

  def latest_valid_step(self, target: Any = None) -> int | None:
    """The newest step whose arrays match their checksum (the step `restore(latest_step(), ...)` gives).

    Args:
      target: restore into this structure and dtypes; None: as saved.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        self._restore_verified(step, target)
      except CorruptCheckpointError:
        continue
      return step
    return None

  def restore(self, step: int, target: Any, *, fallback: bool | None = None) -> Any:
    """Restores checkpoint `step` into the structure, dtypes (and shardings) of `target`, verified.

    Args:
      step: the step to restore.
      target: arrays or ShapeDtypeStructs.
      fallback: when checkpoint `step` is corrupt, restore the newest older step that verifies instead
        (with a warning naming both) and move the corrupt one aside (`set_aside_directory`), so
        training resumes from there and can write that step again; nothing is deleted. None (default): fall back only when `step` is the latest step (what
        `loop.fit` restores); the restored tree's own step field says which step it holds.

    Raises:
      CorruptCheckpointError: `step` is corrupt and there is no good checkpoint to fall back to (or
        `fallback` is off); names the checkpoint directory and the leaf.
      IncompatibleCheckpointError: a step was written by an earlier adarank_jax (nothing is deleted).
    """
    try:
      return self._restore_verified(step, target)
    except CorruptCheckpointError as error:
      if fallback is None:
        fallback = step == self.latest_step()
      if not fallback:
        raise
      first_error = error
    for older in sorted((s for s in self.all_steps() if s < step), reverse=True):
      try:
        tree = self._restore_verified(older, target)
      except CorruptCheckpointError as error:
        warnings.warn(str(error), stacklevel=2)
        continue
      kept = self._set_aside(step)
      warnings.warn(
        f"{first_error}; restored the previous good checkpoint {self.step_directory(older)} "
        f"instead of {self.step_directory(step)}, which was moved to {kept}; training continues "
        f"from step {older}.",
        stacklevel=2,
      )
      return tree
    raise CorruptCheckpointError(
      f"{first_error}\n  No older checkpoint in {self.directory} verifies "
      f"either; delete {self.directory} to start over."
    ) from None

  def set_aside_directory(self) -> Path:
    """Where corrupt steps are moved: `<checkpoints>.corrupt/` beside the checkpoint directory, out of
    the manager's sight, each as `<step>` (or `<step>.1`, `<step>.2`, ... when that name is taken)."""
    return self.directory.parent / f"{self.directory.name}.corrupt"

  def _set_aside(self, step: int) -> Path:
    """Moves checkpoint `step` into `set_aside_directory()` and returns its new path."""
    target = files.move_aside(self.step_directory(step), self.set_aside_directory())
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()
