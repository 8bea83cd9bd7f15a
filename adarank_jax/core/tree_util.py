"""Path-keyed views of param trees and the checks every loader runs before building a tree.

A param tree is a nested dict of arrays (str keys; int keys for list indices, as `nnx.to_pure_dict`
gives). Its flat view maps "/"-joined paths to leaves: {"transformer/resblocks/0/attn/in_proj/kernel": a}.
Layer selection is data: a list of regexes matched against these paths (`select`), and it is the only
layer filter in the code base.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


class StructureError(ValueError):
  """A tree's keys or shapes differ from what was expected."""


class NonFiniteError(ValueError):
  """A tree holds NaN or Inf values."""


def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"a/b/0/c": leaf}. Every non-dict value is a leaf (None included)."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix=f"{path}/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
  """Inverse of `flatten`. All-digit path parts become int keys (list indices)."""
  tree: dict[Any, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise StructureError(f"path {path!r} runs through a leaf at {part!r}")
    node[last] = value
  return tree


def select(tree: Mapping[Any, Any], patterns: Sequence[str]) -> dict[Any, Any]:
  """A bool tree of `tree`'s structure: True where some pattern fully matches the leaf's path."""
  compiled = [re.compile(p) for p in patterns]
  flat = flatten(tree)
  return unflatten({path: any(c.fullmatch(path) for c in compiled) for path in flat})


def shapes(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a flat tree."""
  return {path: tuple(np.shape(value)) for path, value in flat.items()}


def check_structure(
  expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, Any], *, source: str
) -> None:
  """Raises StructureError naming `source` and every missing, unexpected and mis-shaped key.

  Args:
    expected: flat path -> expected shape.
    actual: flat path -> array (anything with a shape).
    source: what the arrays came from (a file or directory), named in the error.
  """
  missing = sorted(set(expected) - set(actual))
  unexpected = sorted(set(actual) - set(expected))
  mismatched = sorted(
    f"{key}: expected shape {tuple(expected[key])}, got {tuple(np.shape(actual[key]))}"
    for key in set(expected) & set(actual)
    if tuple(np.shape(actual[key])) != tuple(expected[key])
  )
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
  if problems:
    raise StructureError(f"{source}: " + "\n  ".join(problems))


def check_finite(flat: Mapping[str, Any], *, source: str) -> None:
  """Raises NonFiniteError naming `source` and every key that holds NaN or Inf."""
  bad = []
  for key, value in flat.items():
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.inexact) or array.dtype.name == "bfloat16":
      if not np.isfinite(array.astype(np.float32)).all():
        bad.append(key)
  if bad:
    raise NonFiniteError(f"{source}: NaN or Inf values in {', '.join(sorted(bad))}")


# ------------------------------------------------------------------------------------------------
# Digests: what a checkpoint records and what processes compare


def _key_name(key: Any) -> str:
  for attribute in ("key", "idx", "name"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_leaves(tree: Any) -> dict[str, Any]:
  """'/'-joined leaf paths -> leaves (dict keys 0 and '0' give the same name, as Orbax restores them)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def host_array(leaf: Any) -> np.ndarray | None:
  """The leaf as one numpy array, or None where this process does not hold all of it (a replicated
  leaf of a run of several processes is whole on every process)."""
  if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
    return None
  return np.ascontiguousarray(np.asarray(jax.device_get(leaf)))


def digest(array: np.ndarray) -> str:
  digest = hashlib.sha256(f"{array.dtype.name}:{tuple(array.shape)};".encode())
  digest.update(array.tobytes())
  return digest.hexdigest()


def checksums(tree: Any) -> dict[str, dict[str, Any]] | None:
  """{leaf path: {"dtype", "shape", "sha256"}} of `tree`; None if some leaf spans other hosts."""
  out = {}
  for name, leaf in path_leaves(tree).items():
    array = host_array(leaf)
    if array is None:
      return None
    out[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "sha256": digest(array)}
  return out
