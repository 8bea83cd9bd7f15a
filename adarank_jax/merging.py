"""Rebuilds merged weights from the origin, the task factors, the masks and the coefficients.

SPEC section 3, with lambda_{t,k} one coefficient per task per tensor:
  SVD leaf k:   W_k = origin_k + sum_t lambda_{t,k} U_{t,k} diag(b_{t,k} * s_{t,k}) V_{t,k}^T
  dense leaf k: W_k = origin_k + sum_t lambda_{t,k} tau_{t,k}
The SVD sum is ONE matmul: (m, T*r) @ (T*r, n), with the columns of U scaled by lambda * b * s.

Only the leaves present in `factors` are merged. Everything else in `origin` (heads, embeddings,
integer buffers, or any part left out by `task_vectors(include=...)`) is returned unchanged, so
a caller merges a subtree simply by passing factors for that subtree only.
Math runs in float32 even when the factors are stored in bfloat16 (float64 when the inputs are
float64, e.g. for finite-difference tests under `jax.enable_x64`); outputs take the origin's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax import masking
from adarank_jax import tree_util
from adarank_jax.decomposition import SVD, is_svd


def init_coefficients(factors: Mapping[Any, Any], *, num_tasks: int, prior: float
                      ) -> dict[Any, Any]:
  """lambda: a float32 (T,) array filled with `prior` for every leaf (SVD and dense) of `factors`."""
  return tree_util.unflatten({
      path: jnp.full((num_tasks,), prior, jnp.float32) for path in tree_util.flatten(factors)})


def _compute_dtype(*arrays: Any) -> Any:
  """float32, or a wider float type if an input has one."""
  return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in arrays))


def svd_delta(svd: SVD, weights: jax.Array, *, precision: Any = None) -> jax.Array:
  """sum_t U_t diag(weights_t * s_t) V_t^T as one (m, T*r) @ (T*r, n) matmul, in float32 (or wider).

  Args:
    svd: factors u (T, m, r), s (T, r), vt (T, r, n).
    weights: (T, r) per-component weights (lambda_t * mask_t).
    precision: `jax.lax.Precision` of the matmul; None is the backend default (TF32 / bf16 passes
      on some accelerators), `jax.lax.Precision.HIGHEST` full float32.

  Returns:
    (m, n), float32 unless an input is wider.
  """
  tasks, m, rank = svd.u.shape
  dtype = _compute_dtype(weights, *svd)
  scale = weights.astype(dtype) * svd.s.astype(dtype)                       # (T, r)
  left = svd.u.astype(dtype) * scale[:, None, :]                            # (T, m, r)
  left = jnp.transpose(left, (1, 0, 2)).reshape(m, tasks * rank)            # (m, T*r)
  right = svd.vt.astype(dtype).reshape(tasks * rank, svd.vt.shape[-1])      # (T*r, n)
  return jnp.matmul(left, right, precision=precision)


def dense_delta(tau: jax.Array, coefficients: jax.Array) -> jax.Array:
  """sum_t coefficients_t tau_t: (T,), (T, ...) -> (...), float32 unless an input is wider."""
  dtype = _compute_dtype(coefficients, tau)
  return jnp.tensordot(coefficients.astype(dtype), tau.astype(dtype), axes=1)


def _lookup(flat: Mapping[str, Any], path: str, what: str, shape: tuple[int, ...]) -> Any:
  if path not in flat:
    raise ValueError(f'merge: {what} has no entry for key {path!r}')
  if tuple(np.shape(flat[path])) != shape:
    raise ValueError(f'merge: {what}[{path!r}] has shape {tuple(np.shape(flat[path]))}; '
                     f'expected {shape}')
  return flat[path]


def merge(origin: Mapping[Any, Any], factors: Mapping[Any, Any], mask_logits: Mapping[Any, Any],
          coefficients: Mapping[Any, Any], *, temperature: float, mask_mode: str = 'ste',
          precision: Any = None) -> dict[Any, Any]:
  """The merged param tree (pure; jittable and differentiable in mask_logits and coefficients).

  Args:
    origin: param tree (theta_0 for TA, theta_avg for CART).
    factors: tree from `decomposition.decompose` whose paths are a subset of origin's: SVD leaves
      (u (T,m,r), s (T,r), vt (T,r,n)) for matrices of shape (m, n), dense (T, ...) elsewhere.
    mask_logits: (T, r) logits for every SVD path of `factors` (`masking.init_logits`).
    coefficients: (T,) lambda for every path of `factors` (`init_coefficients`).
    temperature: mask temperature (10 in the AdaRank configs).
    mask_mode: 'ste' (training: hard forward, sigmoid gradient), 'hard' (evaluation and export)
      or 'soft' (the sigmoid itself: a smooth surrogate).
    precision: matmul precision of the SVD rebuild (see `svd_delta`).

  Returns:
    A tree with origin's structure and dtypes; leaves absent from `factors` are origin's own.

  Raises:
    ValueError: unknown `mask_mode`, a factor path not in `origin`, or a missing or mis-shaped
      mask logit / coefficient / factor.
  """
  if mask_mode not in masking.MASK_FNS:
    raise ValueError(f'merge: mask_mode={mask_mode!r}; expected one of {sorted(masking.MASK_FNS)}')
  mask_fn = masking.MASK_FNS[mask_mode]
  logit_flat = tree_util.flatten(mask_logits)
  coef_flat = tree_util.flatten(coefficients)

  def delta(path: str, factor: Any, shape: tuple[int, ...]) -> jax.Array:
    if is_svd(factor):
      tasks, m, rank = factor.u.shape
      if shape != (m, factor.vt.shape[-1]):
        raise ValueError(f'merge: factors[{path!r}] rebuild a {(m, factor.vt.shape[-1])} matrix; '
                         f'the origin is {shape}')
      lam = _lookup(coef_flat, path, 'coefficients', (tasks,))
      mask = mask_fn(_lookup(logit_flat, path, 'mask_logits', (tasks, rank)), temperature)
      return svd_delta(factor, lam[:, None] * mask, precision=precision)
    tasks = np.shape(factor)[0]
    if tuple(np.shape(factor)[1:]) != shape:
      raise ValueError(f'merge: factors[{path!r}] has shape {np.shape(factor)}; expected '
                       f'(tasks, *{shape})')
    return dense_delta(factor, _lookup(coef_flat, path, 'coefficients', (tasks,)))

  return add_deltas(origin, factors, delta, name='merge')


def add_deltas(origin: Mapping[Any, Any], deltas: Mapping[Any, Any],
               delta_fn: Callable[[str, Any, tuple[int, ...]], jax.Array], *, name: str
               ) -> dict[Any, Any]:
  """origin + delta_fn(path, deltas[path], origin shape) where `deltas` has the path; origin elsewhere.

  The one place every merge (AdaRank and the static baselines) adds its update to the origin: the
  sum is computed in float32 (float64 if either side is float64) and cast back to the origin's dtype.
  Leaves without a delta are origin's own objects.
  """
  origin_flat = tree_util.flatten(origin)
  delta_flat = tree_util.flatten(deltas)
  unknown = sorted(set(delta_flat) - set(origin_flat))
  if unknown:
    raise ValueError(f'{name}: the deltas hold keys that the origin lacks: {unknown}')
  merged = {}
  for path, base in origin_flat.items():
    if path in delta_flat:
      base = jnp.asarray(base)
      update = delta_fn(path, delta_flat[path], tuple(base.shape))
      merged[path] = (base.astype(_compute_dtype(base, update)) + update).astype(base.dtype)
    else:
      merged[path] = base
  return tree_util.unflatten(merged)
