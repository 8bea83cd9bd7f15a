"""Writing files so that a crash never leaves half of one, reading JSON Lines that a crash may have torn,
and the workdir lock. The only module of the run that writes a whole file by hand.

Every file goes through `write_atomic`: a temporary file in the same directory (named `.<name>.<random>.tmp`),
fsync, then os.replace over the target, so a reader sees the old file or the new one, never a part. A run
killed mid-write leaves that temporary file behind; `remove_stale_temps` deletes those at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


def _temp_name(path: Path) -> str:
  return f".{path.name}."


def _with_path(error: OSError, path: Path) -> OSError:
  """`error` naming `path` (a failed write() or fsync(), ENOSPC say, has no file name of its own)."""
  if error.filename is not None:
    return error
  return type(error)(error.errno, error.strerror or os.strerror(error.errno or 0), str(path))


def _umask() -> int:
  """The process's umask, read without changing it where Linux reports it (/proc/self/status): the
  os.umask(0)-and-back fallback would briefly let other threads create files without it."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_atomic(path: str | os.PathLike[str], data: str | bytes | Callable[[str], None]) -> None:
  """Writes `data` (text, bytes, or a function that writes the file whose path it is given) to `path`.

  Temporary file in the same directory, flushed to disk, then renamed over `path`, with the mode that
  `open(path, "w")` would give it (0o666 & ~umask; mkstemp's own is 0o600, private to its owner). An
  OSError (ENOSPC, a read-only directory) names `path`; the temporary file is removed on any failure.
  """
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_name(path), suffix=TEMP_SUFFIX)
  except OSError as error:
    raise _with_path(error, path) from error
  try:
    if callable(data):
      os.close(fd)
      fd = -1
      data(tmp)
      fd = os.open(tmp, os.O_RDONLY)
    else:
      with os.fdopen(fd, "wb", closefd=False) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.fchmod(fd, 0o666 & ~_umask())
    os.fsync(fd)
    os.close(fd)
    fd = -1
    os.replace(tmp, path)
    _fsync_dir(path.parent)
  except BaseException as error:
    if fd >= 0:
      with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(error, OSError):
      raise _with_path(error, path) from error
    raise


def _fsync_dir(directory: Path) -> None:
  with contextlib.suppress(OSError):  # not every file system lets a directory be opened / synced
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_json(path: str | os.PathLike[str], value: Any, **dumps_kwargs) -> None:
  """json.dumps(value, **dumps_kwargs) + newline, atomically."""
  write_atomic(path, json.dumps(value, **dumps_kwargs) + "\n")


def replace_dir(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> None:
  """Builds a directory with fill(tmp_dir) next to `path`, then puts it in place of `path` (if any).

  `fill` gets a path that does not exist yet, in the same directory (Orbax creates its own directory).
  The old directory is renamed aside before the new one is renamed in: a reader sees the old tree or the
  new one (or, after a kill between the two renames, none; never a mix).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_name(path), suffix=TEMP_SUFFIX))
  tmp.rmdir()
  old = None
  try:
    fill(tmp)
    if path.exists():
      old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=TEMP_SUFFIX))
      old.rmdir()
      os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and old.exists():
      shutil.rmtree(old, ignore_errors=True)


def is_stale_temp(name: str) -> bool:
  """Names left by a killed atomic write: `.<name>.<random>.tmp` (this module, state_dict, report) and
  `<name>.tmp<pid>` (models/heads.py)."""
  if name.startswith(".") and name.endswith(TEMP_SUFFIX) and name != TEMP_SUFFIX:
    return True
  head, sep, tail = name.rpartition(".tmp")
  return bool(sep and head and tail.isdigit())


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
  """Deletes what killed atomic writes left under `directory` (recursively); returns what it deleted.

  Call it only while holding the directory's lock (`WorkdirLock`): a live writer's temporary files look
  the same.
  """
  directory = Path(directory)
  removed = []
  if not directory.is_dir():
    return removed
  for root, dirs, names in os.walk(directory):
    for name in list(dirs) + names:
      if is_stale_temp(name):
        target = Path(root) / name
        if target.is_dir() and not target.is_symlink():
          shutil.rmtree(target, ignore_errors=True)
          dirs.remove(name)
        else:
          with contextlib.suppress(FileNotFoundError):
            target.unlink()
        removed.append(target)
  return removed


class CorruptFileError(ValueError):
  """A file that should hold JSON is truncated or corrupt; the message names it."""


def read_json(path: str | os.PathLike[str]) -> Any:
  """json.load of `path`; a truncated or corrupt file raises CorruptFileError naming it."""
  path = Path(path)
  text = path.read_text(encoding="utf-8")
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise CorruptFileError(
      f"{path}: truncated or corrupt JSON ({error}); delete or restore the file"
    ) from error


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a JSON Lines file ([] if it does not exist).

  A torn last record (a run killed mid-append) is dropped with a warning naming the file; a corrupt record
  anywhere else raises CorruptFileError naming the file and line.
  """
  path = Path(path)
  if not path.exists():
    return []
  text = path.read_text(encoding="utf-8", errors="replace")
  lines = text.split("\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    except ValueError as error:
      is_last = all(not rest.strip() for rest in lines[number:])
      if is_last and not text.endswith("\n"):
        warnings.warn(
          f"{path}: dropped a torn last record (line {number}; a killed run was writing it)", stacklevel=2
        )
        break
      raise CorruptFileError(f"{path}: line {number} is not a JSON record ({error})") from error
    records.append(dict(record))
  return records


def rewrite_jsonl(path: str | os.PathLike[str], keep: Callable[[dict[str, Any]], bool]) -> int:
  """Keeps only the records of `path` for which keep(record); rewrites it atomically. Returns the number
  dropped (a torn last record is dropped too). A missing file stays missing."""
  path = Path(path)
  if not path.exists():
    return 0
  text = path.read_text(encoding="utf-8", errors="replace")
  records = read_jsonl(path)
  kept = [r for r in records if keep(r)]
  torn = bool(text.strip()) and not text.endswith("\n")
  if len(kept) != len(records) or torn:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
  return len(records) - len(kept)


class WorkdirBusyError(RuntimeError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on a workdir: fcntl.flock on `<workdir>/.lock`, which holds the holder's pid.

  The OS drops the lock when the process exits however it exits, so a killed run never leaves a stale
  lock. A second run on the same workdir fails at once with WorkdirBusyError naming the holder's pid.
  """

  def __init__(self, workdir: str | os.PathLike[str]):
    self.path = Path(workdir) / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    workdir = self.path.parent
    if workdir.exists() and not workdir.is_dir():
      raise NotADirectoryError(errno.ENOTDIR, "the workdir is a file, not a directory", str(workdir))
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
      raise _with_path(error, self.path) from error
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirBusyError(  # pylint: disable=raise-missing-from
        f"{workdir}: another run (pid {holder}) is using this workdir (it holds {self.path}); wait "
        f"for it to finish or choose another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def move_aside(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
  """Moves `path` into `directory` (made if needed) under its own name, or `<name>.1`, `<name>.2`, ...
  when that is taken, and returns where it went. Never overwrites or deletes anything."""
  path, directory = Path(path), Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  target, n = directory / path.name, 0
  while target.exists():
    n += 1
    target = directory / f"{path.name}.{n}"
  os.replace(path, target)
  _fsync_dir(directory)
  return target


def remove_if_only_lock(directory: str | os.PathLike[str]) -> bool:
  """Removes `directory` if it holds no file but the workdir lock (empty folders at most): what a run
  refused before it wrote anything leaves. Returns whether it was removed; anything else stays."""
  directory = Path(directory)
  if any(p.name != LOCK_NAME for p in directory.rglob("*") if not p.is_dir()):
    return False
  shutil.rmtree(directory)
  return True


def clear_dir(directory: str | os.PathLike[str], *, keep: tuple[str, ...] = (LOCK_NAME,)) -> None:
  """Deletes everything in `directory` but the names in `keep` (--overwrite: the lock file stays)."""
  directory = Path(directory)
  if not directory.is_dir():
    return
  for child in directory.iterdir():
    if child.name in keep:
      continue
    if child.is_dir() and not child.is_symlink():
      shutil.rmtree(child)
    else:
      child.unlink()
