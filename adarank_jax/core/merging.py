"""Rebuilds merged weights from the origin, the task factors, the masks and the coefficients.

docs/algorithm.md, section 3, with lambda_{t,k} one coefficient per task per tensor:
  SVD leaf k:   W_k = origin_k + sum_t lambda_{t,k} U_{t,k} diag(b_{t,k} * s_{t,k}) V_{t,k}^T
  dense leaf k: W_k = origin_k + sum_t lambda_{t,k} tau_{t,k}
The SVD sum is ONE matmul: (m, T*r) @ (T*r, n), with the columns of U scaled by lambda * b * s.

Cached deltas (`masked_deltas`, `merge(..., deltas=...)`): a training step may keep each task's
D_{t,k} = U_{t,k} diag(b_{t,k} * s_{t,k}) V_{t,k}^T between steps, rebuilt from the factors whenever
its hard mask changes (`refresh_deltas`). The forward pass is then origin_k + sum_t lambda_{t,k} D_{t,k}
(T*m*n flops instead of 2*m*n*T*r) and the backward pass computes only g_{t,i} = (U_t^T G V_t)_{ii}
(2*m*n*r per task, the same product the one-matmul rebuild needs; G times the factor on its longer
side, so the intermediate is (T, r, min(m, n))), from which
  dL/dlambda_t = sum_i b_{t,i} s_{t,i} g_{t,i},   dL/dmask_{t,i} = lambda_t s_{t,i} g_{t,i}.
The cache also holds U_t^T, (T, r, m) (`Cached.ut`): with both factors stored one singular vector per
row, each product's output lies in the layout of the factor it is multiplied with, so the step
transposes no factor and no intermediate (U is stored (T, m, r): without the copy XLA transposed U, or
the (T, r, m) product, at every step).
The values are those of the one-matmul rebuild up to float32 summation order.

Only the leaves present in `factors` are merged. Everything else in `origin` (heads, embeddings,
integer buffers, or any part left out by `task_vectors(include=...)`) is returned unchanged, so
a caller merges a subtree simply by passing factors for that subtree only.
Math runs in float32 even when the factors are stored in bfloat16 (float64 when the inputs are
float64, e.g. for finite-difference tests under `jax.enable_x64`); outputs take the origin's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax.core import masking, tree_util
from adarank_jax.core.decomposition import SVD, is_svd

COEFFICIENTS = ("tensor", "task")


class Cached(NamedTuple):
  """The delta cache of one SVD leaf (`init_deltas`): what the step reads instead of the factors.

  Attributes:
    deltas: (T, m, n) float32, D_t = U_t diag(b_t * s_t) V_t^T for the current hard masks b_t.
    ut: (T, r, m), U_t^T in the factors' dtype: the masks' gradient reads U one component per row,
      as it reads V^T (see the module doc).
  """

  deltas: jax.Array
  ut: jax.Array


def init_coefficients(
  factors: Mapping[Any, Any], *, num_tasks: int, prior: float, per: str = "tensor"
) -> Any:
  """lambda filled with `prior`: per='tensor' a float32 (T,) array for every leaf (SVD and dense) of
  `factors` (AdaRank, layer-wise AdaMerging); per='task' one (T,) array for all of them (task-wise
  AdaMerging). `merge` takes either form."""
  if per == "task":
    return jnp.full((num_tasks,), prior, jnp.float32)
  if per != "tensor":
    raise ValueError(f"init_coefficients: per={per!r}; expected one of {COEFFICIENTS}")
  return tree_util.unflatten(
    {path: jnp.full((num_tasks,), prior, jnp.float32) for path in tree_util.flatten(factors)}
  )


def clamp(x: jax.Array, low: float, high: float) -> jax.Array:
  """x clipped to [low, high] with torch.clamp's gradient: 1 inside the closed interval, 0 outside.

  AdaMerging clamps its coefficients this way in the forward pass, so a coefficient pushed past a
  bound stays there (its gradient is zero from then on).
  """
  return jnp.where(x < low, low, jnp.where(x > high, high, x)).astype(x.dtype)


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
  scale = weights.astype(dtype) * svd.s.astype(dtype)  # (T, r)
  left = svd.u.astype(dtype) * scale[:, None, :]  # (T, m, r)
  left = jnp.transpose(left, (1, 0, 2)).reshape(m, tasks * rank)  # (m, T*r)
  right = svd.vt.astype(dtype).reshape(tasks * rank, svd.vt.shape[-1])  # (T*r, n)
  return jnp.matmul(left, right, precision=precision)


def masked_deltas(svd: SVD, mask: jax.Array, *, precision: Any = None) -> jax.Array:
  """(T, m, n): D_t = U_t diag(mask_t * s_t) V_t^T for every task, in float32 (or wider)."""
  dtype = _compute_dtype(mask, *svd)
  left = svd.u.astype(dtype) * (mask.astype(dtype) * svd.s.astype(dtype))[:, None, :]
  return jnp.matmul(left, svd.vt.astype(dtype), precision=precision)


def cached_svd_delta(
  cached: Cached,
  s: jax.Array,
  vt: jax.Array,
  coefficients: jax.Array,
  mask: jax.Array,
  *,
  precision: Any = None,
) -> jax.Array:
  """sum_t coefficients_t deltas_t, differentiable in `coefficients` and `mask` as `svd_delta` is.

  `cached` must hold `masked_deltas(svd, hard(mask))` and svd.u^T (`init_deltas`), `s` and `vt` the
  same factors' other two: the forward value is read from the deltas, and the gradients are those
  of sum_t U_t diag(coefficients_t * mask_t * s_t) V_t^T (see the module doc). The cache and the
  factors are constants (no gradient).
  """
  return _cached_svd_delta(precision, cached, s, vt, coefficients, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cached_svd_delta(precision, cached, s, vt, coefficients, mask):
  dtype = _compute_dtype(coefficients, cached.deltas)
  return jnp.tensordot(coefficients.astype(dtype), cached.deltas.astype(dtype), axes=1)


def _cached_svd_delta_fwd(precision, cached, s, vt, coefficients, mask):
  value = _cached_svd_delta(precision, cached, s, vt, coefficients, mask)
  return value, (cached, s, vt, coefficients, mask)


def _cached_svd_delta_bwd(precision, residuals, grad):
  cached, s, vt, coefficients, mask = residuals
  dtype = _compute_dtype(grad, cached.ut, s, vt)
  ut, s32, vt32, g32 = cached.ut.astype(dtype), s.astype(dtype), vt.astype(dtype), grad.astype(dtype)
  # g_{t,i} = (U_t^T G V_t)_{ii}: one product of G with the factor on its longer side, then a
  # row-wise dot with the other factor, both (T, r, .); the (T, r, min(m, n)) intermediate is the smaller one.
  m, n = grad.shape
  if m <= n:  # V_t^T G^T: (r, n) @ (n, m) per task, then sum_m (V_t^T G^T)[i, m] U_t^T[i, m]
    product = jnp.einsum("trn,mn->trm", vt32, g32, precision=precision)
    g = jnp.sum(product * ut, axis=-1) * s32  # (T, r): s_i g_i
  else:  # U_t^T G: (r, m) @ (m, n) per task, then sum_n (U_t^T G)[i, n] V_t^T[i, n]
    product = jnp.einsum("trm,mn->trn", ut, g32, precision=precision)
    g = jnp.sum(product * vt32, axis=-1) * s32
  grad_coefficients = jnp.sum(g * mask.astype(dtype), axis=-1)
  grad_mask = coefficients.astype(dtype)[:, None] * g
  return (
    jax.tree.map(jnp.zeros_like, cached),
    jnp.zeros_like(s),
    jnp.zeros_like(vt),
    grad_coefficients.astype(coefficients.dtype),
    grad_mask.astype(mask.dtype),
  )


_cached_svd_delta.defvjp(_cached_svd_delta_fwd, _cached_svd_delta_bwd)


def dense_delta(tau: jax.Array, coefficients: jax.Array) -> jax.Array:
  """sum_t coefficients_t tau_t: (T,), (T, ...) -> (...), float32 unless an input is wider."""
  dtype = _compute_dtype(coefficients, tau)
  return jnp.tensordot(coefficients.astype(dtype), tau.astype(dtype), axes=1)


def _check_shape(value: Any, path: str, what: str, shape: tuple[int, ...]) -> Any:
  if tuple(np.shape(value)) != shape:
    raise ValueError(f"merge: {what}[{path!r}] has shape {tuple(np.shape(value))}; expected {shape}")
  return value


def _lookup(flat: Mapping[str, Any], path: str, what: str, shape: tuple[int, ...] | None = None) -> Any:
  """flat[path], checked to have `shape` (None: any value)."""
  if path not in flat:
    raise ValueError(f"merge: {what} has no entry for key {path!r}")
  return flat[path] if shape is None else _check_shape(flat[path], path, what, shape)


def merge(
  origin: Mapping[Any, Any],
  factors: Mapping[Any, Any],
  mask_logits: Mapping[Any, Any],
  coefficients: Any,
  *,
  temperature: float,
  mask_mode: str = "ste",
  precision: Any = None,
  deltas: Mapping[Any, Any] | None = None,
  coefficient_range: tuple[float, float] | None = None,
) -> dict[Any, Any]:
  """The merged param tree (pure; jittable and differentiable in mask_logits and coefficients).

  Args:
    origin: param tree (theta_0 for TA, theta_avg for CART).
    factors: tree from `decomposition.decompose` whose paths are a subset of origin's: SVD leaves
      (u (T,m,r), s (T,r), vt (T,r,n)) for matrices of shape (m, n), dense (T, ...) elsewhere.
    mask_logits: (T, r) logits for every SVD path of `factors` (`masking.init_logits`).
    coefficients: (T,) lambda for every path of `factors`, or one (T,) array shared by every path
      (`init_coefficients`, per='tensor' or 'task').
    temperature: mask temperature (10 in the AdaRank configs).
    mask_mode: 'ste' (training: hard forward, sigmoid gradient), 'hard' (evaluation and export)
      or 'soft' (the sigmoid itself: a smooth surrogate).
    precision: matmul precision of the SVD rebuild (see `svd_delta`).
    deltas: optional delta cache, a `Cached` for every SVD path whose deltas (T, m, n) equal
      `masked_deltas(factor, hard_mask(logits))` (`init_deltas` / `refresh_deltas`); the SVD leaves
      are then summed from them (`cached_svd_delta`). Only with the hard-forward modes 'ste'/'hard'.
    coefficient_range: (low, high): every lambda is used as `clamp(lambda, low, high)` (AdaMerging's
      [0, 1]); None uses them as they are (AdaRank).

  Returns:
    A tree with origin's structure and dtypes; leaves absent from `factors` are origin's own.

  Raises:
    ValueError: unknown `mask_mode`, a factor path not in `origin`, or a missing or mis-shaped
      mask logit / coefficient / factor.
  """
  if mask_mode not in masking.MASK_FNS:
    raise ValueError(f"merge: mask_mode={mask_mode!r}; expected one of {sorted(masking.MASK_FNS)}")
  if deltas is not None and mask_mode == "soft":
    raise ValueError("merge: cached deltas hold hard-masked components; mask_mode='soft' cannot use them")
  mask_fn = masking.MASK_FNS[mask_mode]
  delta_cache = {} if deltas is None else tree_util.flatten(deltas)
  logit_flat = tree_util.flatten(mask_logits)
  if isinstance(coefficients, Mapping):
    coef_flat = tree_util.flatten(coefficients)
  else:  # one (T,) array for every tensor
    coef_flat = dict.fromkeys(tree_util.flatten(factors), coefficients)
  if coefficient_range is not None:
    coef_flat = {path: clamp(lam, *coefficient_range) for path, lam in coef_flat.items()}

  def delta(path: str, factor: Any, shape: tuple[int, ...]) -> jax.Array:
    if is_svd(factor):
      tasks, m, rank = factor.u.shape
      if shape != (m, factor.vt.shape[-1]):
        raise ValueError(
          f"merge: factors[{path!r}] rebuild a {(m, factor.vt.shape[-1])} matrix; the origin is {shape}"
        )
      lam = _lookup(coef_flat, path, "coefficients", (tasks,))
      mask = mask_fn(_lookup(logit_flat, path, "mask_logits", (tasks, rank)), temperature)
      if deltas is not None:
        cached = _lookup(delta_cache, path, "deltas")
        if not isinstance(cached, Cached):
          raise ValueError(
            f"merge: deltas[{path!r}] is a {type(cached).__name__}; expected a merging.Cached (init_deltas)"
          )
        _check_shape(cached.deltas, path, "deltas.deltas", (tasks, *shape))
        _check_shape(cached.ut, path, "deltas.ut", (tasks, rank, m))
        return cached_svd_delta(cached, factor.s, factor.vt, lam, mask, precision=precision)
      return svd_delta(factor, lam[:, None] * mask, precision=precision)
    tasks = np.shape(factor)[0]
    if tuple(np.shape(factor)[1:]) != shape:
      raise ValueError(f"merge: factors[{path!r}] has shape {np.shape(factor)}; expected (tasks, *{shape})")
    return dense_delta(factor, _lookup(coef_flat, path, "coefficients", (tasks,)))

  return add_deltas(origin, factors, delta, name="merge")


def init_deltas(
  factors: Mapping[Any, Any], mask_logits: Mapping[Any, Any], *, precision: Any = None
) -> dict[Any, Any]:
  """The delta cache: for every SVD path a `Cached` of `masked_deltas(factor, hard_mask(logits))` and
  the factor's U^T."""
  logit_flat = tree_util.flatten(mask_logits)
  return tree_util.unflatten(
    {
      path: Cached(
        masked_deltas(factor, masking.hard_mask(logit_flat[path]), precision=precision),
        jnp.swapaxes(factor.u, -1, -2),
      )
      for path, factor in tree_util.flatten(factors).items()
      if is_svd(factor)
    }
  )


def refresh_deltas(
  factors: Mapping[Any, Any],
  deltas: Mapping[Any, Any],
  old_logits: Mapping[Any, Any],
  new_logits: Mapping[Any, Any],
  *,
  precision: Any = None,
) -> dict[Any, Any]:
  """`deltas` made current for `new_logits`: D_{t,k} is rebuilt from the factors where task t's hard
  mask of matrix k changed between `old_logits` and `new_logits`, and kept as it is elsewhere.

  Jittable: one `lax.cond` per (task, matrix), so a step in which no mask flips rebuilds nothing.
  The rebuilt delta is computed exactly as `init_deltas` computes it, so a cache never drifts; the
  cache's U^T is kept as it is.
  """
  factor_flat = tree_util.flatten(factors)
  old_flat, new_flat = tree_util.flatten(old_logits), tree_util.flatten(new_logits)
  out = {}
  for path, entry in tree_util.flatten(deltas).items():
    factor, mask = factor_flat[path], masking.hard_mask(new_flat[path])
    changed = jnp.any(masking.hard_mask(old_flat[path]) != mask, axis=-1)  # (T,)

    def rebuild(t, cached, factor=factor, mask=mask, changed=changed):
      def fresh(cached):
        one = SVD(*(jax.lax.dynamic_slice_in_dim(x, t, 1) for x in factor))
        update = masked_deltas(one, jax.lax.dynamic_slice_in_dim(mask, t, 1), precision=precision)
        return jax.lax.dynamic_update_slice_in_dim(cached, update.astype(cached.dtype), t, 0)

      return jax.lax.cond(changed[t], fresh, lambda cached: cached, cached)

    out[path] = entry._replace(deltas=jax.lax.fori_loop(0, entry.deltas.shape[0], rebuild, entry.deltas))
  return tree_util.unflatten(out)


def add_deltas(
  origin: Mapping[Any, Any],
  deltas: Mapping[Any, Any],
  delta_fn: Callable[[str, Any, tuple[int, ...]], jax.Array],
  *,
  name: str,
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
    raise ValueError(f"{name}: the deltas hold keys that the origin lacks: {unknown}")
  merged = {}
  for path, base in origin_flat.items():
    if path in delta_flat:
      base = jnp.asarray(base)
      update = delta_fn(path, delta_flat[path], tuple(base.shape))
      merged[path] = (base.astype(_compute_dtype(base, update)) + update).astype(base.dtype)
    else:
      merged[path] = base
  return tree_util.unflatten(merged)
