"""Static (training-free) merges built from the same pieces as AdaRank (SPEC sections 2 and 9).

Every function is pure over param trees. `origin`, `tau` and `factors` come from
`task_vectors.task_vectors` and `decomposition.decompose`; leaves of `origin` that have no task
vector (heads, integer buffers, excluded parts) are returned unchanged, as in `merging.merge`.

  zero_shot(pretrained)                         theta_0
  weight_average(finetuned)                     mean_t theta_t
  task_arithmetic(origin, tau, scaling)         theta_0 + lambda sum_t tau_t            (TA, lambda 0.3)
  cart(origin, factors, scaling, rank_ratio)    theta_avg + lambda sum_t SVD_k(taubar_t)  (CART)
  ties(origin, tau, density, scaling)           theta_0 + lambda TIES(tau)              (TIES-merging)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax import tree_util
from adarank_jax.decomposition import SVD, is_svd, truncate
from adarank_jax.merging import add_deltas, dense_delta, svd_delta
from adarank_jax.task_vectors import weight_average

__all__ = ['zero_shot', 'weight_average', 'task_arithmetic', 'cart', 'cart_rank', 'ties']


def _sum_over_tasks(leaf: Any, scaling: float) -> jax.Array:
  """scaling * sum_t of a dense (T, ...) task vector or of the matrices an SVD rebuilds."""
  if is_svd(leaf):
    return svd_delta(leaf, jnp.full(leaf.s.shape, scaling, jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return dense_delta(leaf, jnp.full((np.shape(leaf)[0],), scaling, jnp.float32))


def zero_shot(pretrained: Mapping[Any, Any]) -> Mapping[Any, Any]:
  """The pretrained model itself (the zero-shot row of the tables)."""
  return pretrained


def task_arithmetic(origin: Mapping[Any, Any], tau: Mapping[Any, Any], *, scaling: float
                    ) -> dict[Any, Any]:
  """Task Arithmetic: origin + scaling * sum_t tau_t, one scalar for every tensor.

  Args:
    origin: theta_0 (from `task_vectors(..., origin='pretrained')`).
    tau: dense (T, ...) task vectors, or a factor tree (SVD leaves are rebuilt at their stored rank).
    scaling: lambda (0.3 in the TA configs).
  """
  return add_deltas(origin, tau, lambda _, leaf, __: _sum_over_tasks(leaf, scaling),
                    name='task_arithmetic')


def cart_rank(svd: SVD, rank_ratio: float) -> int:
  """CART's kept rank k = max(1, int(rank_ratio * min(m, n))) for factors of an (m, n) matrix."""
  return max(1, int(rank_ratio * min(svd.u.shape[-2], svd.vt.shape[-1])))


def cart(origin: Mapping[Any, Any], factors: Mapping[Any, Any], *, scaling: float,
         rank_ratio: float) -> dict[Any, Any]:
  """CART: theta_avg + scaling * sum_t LR_k(taubar_t) (SPEC section 2).

  Args:
    origin: theta_avg (from `task_vectors(..., origin='average')`).
    factors: `decompose` of the centred task vectors taubar_t = theta_t - theta_avg at full rank.
      SVD leaves keep their top k = max(1, int(rank_ratio * min(m, n))) components; dense leaves
      are summed as they are (they sum to zero, so those tensors stay exactly the average).
    scaling: lambda (2.0 for ViT-B/32 with 8 tasks).
    rank_ratio: fraction of components kept (0.12 for ViT-B/32 with 8 tasks).
  """
  if not 0.0 < rank_ratio <= 1.0:
    raise ValueError(f'cart: rank_ratio={rank_ratio}; expected a value in (0, 1]')

  def delta(leaf: Any) -> jax.Array:
    if is_svd(leaf):
      leaf = truncate(leaf, cart_rank(leaf, rank_ratio))
    return _sum_over_tasks(leaf, scaling)

  return add_deltas(origin, factors, lambda _, leaf, __: delta(leaf), name='cart')


def _trim_thresholds(leaves: list[jax.Array], density: float) -> jax.Array:
  """(T,) magnitude thresholds: per task, the k-th largest |tau_t| over all leaves, k = int(density * N)."""
  tasks = leaves[0].shape[0]
  thresholds = []
  for t in range(tasks):
    magnitudes = jnp.concatenate([jnp.abs(leaf[t].astype(jnp.float32)).ravel() for leaf in leaves])
    size = magnitudes.size
    keep = int(density * size)
    thresholds.append(jnp.inf if keep == 0 else jnp.sort(magnitudes)[size - keep])
  return jnp.asarray(thresholds, jnp.float32)


def ties(origin: Mapping[Any, Any], tau: Mapping[Any, Any], *, density: float = 0.2,
         scaling: float = 1.0) -> dict[Any, Any]:
  """TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

  1. Trim: per task, keep the k = int(density * N) entries of largest magnitude over the whole
     flattened task vector (all N entries of all leaves of `tau`; ties at the threshold are kept).
  2. Elect: sign_e = sign(sum_t trimmed_t) per entry (0 where the sum is 0: nothing is kept there).
  3. Disjoint mean: mean of the trimmed values whose sign equals sign_e (0 if none).
  theta = origin + scaling * merged. scaling 1.0 with the mean is the TIES paper's setting
  (FusionBench instead sums and uses 0.3); results must say which one they used.

  Args:
    origin: theta_0.
    tau: dense task vectors (T, ...) (from `task_vectors(..., origin='pretrained')`).
    density: fraction of entries kept per task, in (0, 1].
    scaling: lambda.
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f'ties: density={density}; expected a value in (0, 1]')
  tau_flat = tree_util.flatten(tau)
  svd_keys = sorted(path for path, leaf in tau_flat.items() if is_svd(leaf))
  if svd_keys:
    raise ValueError(f'ties: expects dense task vectors; got SVD factors at {svd_keys}')
  thresholds = _trim_thresholds(list(tau_flat.values()), density)

  def delta(leaf: jax.Array) -> jax.Array:
    leaf = jnp.asarray(leaf).astype(jnp.float32)
    threshold = thresholds.reshape((-1,) + (1,) * (leaf.ndim - 1))
    trimmed = jnp.where(jnp.abs(leaf) >= threshold, leaf, 0.0)
    elected = jnp.sign(trimmed.sum(0))
    agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
    total = jnp.where(agree, trimmed, 0.0).sum(0)
    return scaling * total / jnp.maximum(agree.sum(0), 1)

  return add_deltas(origin, tau, lambda _, leaf, __: delta(leaf), name='ties')
