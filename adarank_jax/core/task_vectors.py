"""Task vectors: fine-tuned minus origin, stacked on a leading task axis.

Two origins (docs/algorithm.md, section 2):
  'pretrained' (Task Arithmetic): origin = theta_0,          tau_t = theta_t - theta_0.
  'average'    (CART):            origin = mean_t theta_t,   tau_t = theta_t - origin.
Integer leaves (step counters, position ids) have no task vector: they are left out of `tau`
and the origin keeps the pretrained value.

Trees are nested dicts of arrays (see `adarank_jax.core.tree_util`). Every tau leaf has shape (T, ...),
T = number of fine-tuned models, in the dtype of the pretrained leaf. Each leaf is built by one
jitted, fused `stack - origin`, so the only new buffer per leaf is the (T, ...) result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adarank_jax.core import tree_util

ORIGINS = ("pretrained", "average")


def is_float(leaf: Any) -> bool:
  """True for floating-point arrays (including bfloat16), the leaves that get task vectors."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


@jax.jit
def _mean(leaves: tuple[jax.Array, ...]) -> jax.Array:
  """(T x (...)) -> (...), accumulated in float32 and cast back to the leaves' dtype."""
  total = sum(leaf.astype(jnp.float32) for leaf in leaves)
  return (total / len(leaves)).astype(leaves[0].dtype)


@jax.jit
def _deltas(origin: jax.Array, leaves: tuple[jax.Array, ...]) -> jax.Array:
  """(...), (T x (...)) -> (T, ...) = stack(leaves) - origin, fused into one output buffer."""
  return jnp.stack([leaf - origin for leaf in leaves]).astype(origin.dtype)


def _check_finetuned(
  base_flat: Mapping[str, Any], finetuned: Sequence[Mapping[Any, Any]]
) -> list[dict[str, Any]]:
  if not finetuned:
    raise ValueError("task_vectors: got no fine-tuned trees; expected at least one")
  expected = tree_util.shapes(base_flat)
  flats = []
  for t, tree in enumerate(finetuned):
    flat = tree_util.flatten(tree)
    tree_util.check_structure(expected, flat, source=f"finetuned[{t}] (vs. the pretrained tree)")
    flats.append(flat)
  return flats


def weight_average(finetuned: Sequence[Mapping[Any, Any]]) -> dict[Any, Any]:
  """theta_avg = mean_t theta_t for float leaves; integer leaves come from finetuned[0].

  Args:
    finetuned: T >= 1 param trees of identical structure and shapes.

  Returns:
    A param tree of the same structure (float leaves averaged in float32, cast back).
  """
  flats = _check_finetuned(tree_util.flatten(finetuned[0]) if finetuned else {}, finetuned)
  return tree_util.unflatten(
    {
      path: _mean(tuple(flat[path] for flat in flats)) if is_float(leaf) else leaf
      for path, leaf in flats[0].items()
    }
  )


def task_vectors(
  base: Mapping[Any, Any],
  finetuned: Sequence[Mapping[Any, Any]],
  *,
  origin: str,
  include: Mapping[Any, Any] | None = None,
) -> tuple[dict[Any, Any], dict[Any, Any]]:
  """Origin and stacked task vectors of T fine-tuned models.

  Args:
    base: pretrained param tree theta_0.
    finetuned: T param trees theta_t with the structure and shapes of `base`.
    origin: 'pretrained' (Task Arithmetic: origin = theta_0) or 'average' (CART: origin =
      mean_t theta_t, float leaves only).
    include: optional bool tree over `base` (e.g. `tree_util.select(base, patterns)`); only
      leaves marked True get a task vector. The origin is computed for every leaf regardless.

  Returns:
    `(origin_tree, tau)`: `origin_tree` has the structure of `base`; `tau` holds, for every
    included float leaf of shape (...), the array (T, ...) of theta_t - origin. Integer and
    excluded leaves are absent from `tau` (they are not merged).

  Raises:
    ValueError: `origin` is unknown, `finetuned` is empty, or `include` misses a key.
    StructureError: a fine-tuned tree's keys or shapes differ from `base`.
  """
  if origin not in ORIGINS:
    raise ValueError(f"task_vectors: origin={origin!r}; expected one of {ORIGINS}")
  base_flat = tree_util.flatten(base)
  flats = _check_finetuned(base_flat, finetuned)
  include_flat = tree_util.flatten(include) if include is not None else None
  if include_flat is not None:
    missing = sorted(set(base_flat) - set(include_flat))
    if missing:
      raise ValueError(f"task_vectors: `include` has no entry for keys {missing}")
  origin_flat, tau_flat = {}, {}
  for path, leaf in base_flat.items():
    if not is_float(leaf):
      origin_flat[path] = leaf
      continue
    stack = tuple(flat[path] for flat in flats)
    origin_flat[path] = _mean(stack) if origin == "average" else leaf
    if include_flat is None or bool(include_flat[path]):
      tau_flat[path] = _deltas(jnp.asarray(origin_flat[path]), stack)
  return tree_util.unflatten(origin_flat), tree_util.unflatten(tau_flat)
