"""Binary masks over singular components, learned through a straight-through estimator.

docs/algorithm.md, section 3: one real logit per (task, component) of every decomposed matrix, shape (T, r).
The forward pass uses the hard mask b = 1[logit > 0] (= 1[sigmoid(logit / temperature) > 0.5]);
the backward pass differentiates the soft mask p = sigmoid(logit / temperature):
  dmask/dlogit = sigmoid'(logit / temperature) / temperature.
The temperature (10 in every AdaRank config) is an argument here; its value lives in the configs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adarank_jax.core import tree_util
from adarank_jax.core.decomposition import is_svd

INIT_LOGIT = 0.1  # |initial logit|: +0.1 keeps a component, -0.1 drops it (official code)


def initial_rank(rank: int, *, initial_rank_ratio: float, num_tasks: int) -> int:
  """Number of components kept at init: floor(rho * rank), with rho == 0 meaning 1 / num_tasks."""
  if not 0.0 <= initial_rank_ratio <= 1.0:
    raise ValueError(
      f"initial_rank_ratio={initial_rank_ratio}; expected a value in [0, 1] (0 means 1 / num_tasks)"
    )
  ratio = 1.0 / num_tasks if initial_rank_ratio == 0 else initial_rank_ratio
  return int(ratio * rank)


def init_logits(factors: Mapping[Any, Any], *, initial_rank_ratio: float, num_tasks: int) -> dict[Any, Any]:
  """Initial mask logits for every SVD leaf of `factors`.

  Args:
    factors: tree from `decomposition.decompose`; only its `SVD` leaves get logits.
    initial_rank_ratio: rho in [0, 1]; the first floor(rho * r) components of each row start ON
      (+0.1) and the rest OFF (-0.1), r being the row's components with a nonzero singular value:
      all of them, but for Iso-CTS's zero padding (or a task vector that is zero in that tensor).
      rho == 1 is full rank (TA configs); rho == 0 means 1 / num_tasks.
    num_tasks: T.

  Returns:
    A tree holding only the SVD paths of `factors`, each a float32 (T, r) array, r = s.shape[-1].

  Raises:
    ValueError: rho outside [0, 1], or an SVD leaf whose leading axis is not `num_tasks`.
  """
  logits = {}
  for path, leaf in tree_util.flatten(factors).items():
    if not is_svd(leaf):
      continue
    tasks, width = leaf.s.shape
    if tasks != num_tasks:
      raise ValueError(f"init_logits: {path!r} has {tasks} tasks; expected num_tasks={num_tasks}")
    # keep[n]: how many of a row's n components start ON (Python's int(rho * n), as the official
    # code computes it), looked up with each row's count so that this also runs traced.
    keep = jnp.asarray(
      [initial_rank(n, initial_rank_ratio=initial_rank_ratio, num_tasks=num_tasks) for n in range(width + 1)]
    )
    rank = jnp.sum(leaf.s != 0, axis=-1)  # (T,)
    on = jnp.arange(width) < keep[rank][:, None]
    logits[path] = jnp.where(on, INIT_LOGIT, -INIT_LOGIT).astype(jnp.float32)
  return tree_util.unflatten(logits)


def soft_mask(logits: jax.Array, temperature: float) -> jax.Array:
  """p = sigmoid(logits / temperature), same shape as `logits`."""
  return jax.nn.sigmoid(logits / temperature)


def hard_mask(logits: jax.Array) -> jax.Array:
  """b = 1[logits > 0] (= 1[soft_mask > 0.5] for any temperature > 0), as logits' dtype."""
  return (logits > 0).astype(logits.dtype)


def straight_through(logits: jax.Array, temperature: float) -> jax.Array:
  """Forward value `hard_mask(logits)`, gradient that of `soft_mask(logits, temperature)`."""
  soft = soft_mask(logits, temperature)
  return soft + jax.lax.stop_gradient(hard_mask(logits) - soft)


# How `merging.merge` turns logits into masks: training uses 'ste', evaluation/export 'hard',
# and 'soft' is the differentiable surrogate (finite-difference checks, the soft-mask ablation).
MASK_FNS: dict[str, Callable[[jax.Array, float], jax.Array]] = {
  "ste": straight_through,
  "soft": soft_mask,
  "hard": lambda logits, temperature: hard_mask(logits),  # the threshold ignores temperature
}


def kept_counts(mask_logits: Mapping[Any, Any], factors: Mapping[Any, Any]) -> dict[Any, Any]:
  """How many components each row keeps, per SVD leaf: an int32 (T,) array for every path of `mask_logits`.

  A component counts when its hard mask is 1 and its singular value (in `factors`) is not zero. One with
  s = 0 cannot change the model whatever its mask (Iso-CTS's zero padding, `baselines.iso_cts_components`,
  or a task vector that is zero in that tensor), so it is neither kept nor dropped.
  """
  flat = tree_util.flatten(factors)
  return tree_util.unflatten(
    {
      path: jnp.sum(hard_mask(logits) * (flat[path].s != 0), axis=-1, dtype=jnp.int32)
      for path, logits in tree_util.flatten(mask_logits).items()
    }
  )


def kept_fraction(mask_logits: Mapping[Any, Any], factors: Mapping[Any, Any]) -> jax.Array:
  """Fraction of all (task, component) pairs with a nonzero singular value whose hard mask is 1 (float32)."""
  flat = tree_util.flatten(factors)
  kept = sum(jnp.sum(c) for c in jax.tree.leaves(kept_counts(mask_logits, factors)))
  existing = sum(jnp.sum(flat[path].s != 0) for path in tree_util.flatten(mask_logits))
  return kept / jnp.maximum(existing, 1)
