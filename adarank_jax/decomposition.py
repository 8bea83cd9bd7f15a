"""Per-task thin SVD of selected task-vector matrices (SPEC section 3, "Decomposition").

For each selected leaf tau of shape (T, m, n): tau_t = U_t diag(s_t) V_t^T with r = min(m, n)
components (torch.linalg.svd(full_matrices=False) in the reference code), optionally truncated to
the top `rank`. Leaves that are not selected stay dense (T, ...) task vectors.

Speed: leaves of equal shape and dtype (e.g. the 12 `mlp/c_fc/kernel`s of a ViT) are stacked and
decomposed by ONE jitted call, vmapped over (layer, task), then split back.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax import tree_util


class SVD(NamedTuple):
  """Thin SVD factors of T stacked matrices: tau_t = u[t] @ diag(s[t]) @ vt[t].

  Attributes:
    u: (T, m, r) left singular vectors.
    s: (T, r) singular values, descending.
    vt: (T, r, n) right singular vectors (transposed).
  """
  u: jax.Array
  s: jax.Array
  vt: jax.Array


def is_svd(x: Any) -> bool:
  """Leaf predicate for `jax.tree.map(..., is_leaf=is_svd)` over factor trees."""
  return isinstance(x, SVD)


@functools.partial(jax.jit, static_argnames=('rank', 'dtype'))
def _svd_group(stack: jax.Array, *, rank: int | None, dtype: Any) -> SVD:
  """(L, T, m, n) -> SVD with u (L, T, m, k), s (L, T, k), vt (L, T, k, n), in float32 math."""
  svd = functools.partial(jnp.linalg.svd, full_matrices=False)
  factors = SVD(*jax.vmap(jax.vmap(svd))(stack.astype(jnp.float32)))
  if rank is not None:
    factors = truncate(factors, rank)
  out_dtype = stack.dtype if dtype is None else dtype
  return SVD(*(x.astype(out_dtype) for x in factors))


def decompose(tau: Mapping[Any, Any], select: Mapping[Any, Any], *, rank: int | None = None,
              dtype: Any = None) -> dict[Any, Any]:
  """SVD factors where `select` is True, dense task vectors elsewhere.

  Args:
    tau: task-vector tree, leaves (T, ...) (from `task_vectors.task_vectors`).
    select: bool tree covering every path of `tau` (e.g. `tree_util.select(tau, patterns)`;
      extra paths are ignored). Selected leaves must be (T, m, n).
    rank: keep only the top `rank` components (min(rank, min(m, n))); None keeps all r = min(m, n).
    dtype: storage dtype of every returned array (e.g. jnp.bfloat16); None keeps tau's dtype.
      The SVD itself always runs in float32.

  Returns:
    A tree with tau's structure: `SVD` leaves (u (T,m,k), s (T,k), vt (T,k,n)) where selected,
    the tau leaf (cast to `dtype`) elsewhere.

  Raises:
    ValueError: `select` misses a path of `tau`, a selected leaf is not (T, m, n), or rank < 1.
  """
  if rank is not None and rank < 1:
    raise ValueError(f'decompose: rank={rank}; expected a positive int or None')
  tau_flat = tree_util.flatten(tau)
  select_flat = tree_util.flatten(select)
  missing = sorted(set(tau_flat) - set(select_flat))
  if missing:
    raise ValueError(f'decompose: `select` has no entry for keys {missing}')
  out: dict[str, Any] = {}
  groups: dict[tuple[tuple[int, ...], Any], list[str]] = {}
  for path, leaf in tau_flat.items():
    if not bool(select_flat[path]):
      out[path] = leaf if dtype is None else jnp.asarray(leaf, dtype)
      continue
    if np.ndim(leaf) != 3:
      raise ValueError(f'decompose: selected key {path!r} has shape {np.shape(leaf)}; expected '
                       '(tasks, m, n), a matrix per task')
    groups.setdefault((np.shape(leaf), jnp.result_type(leaf)), []).append(path)
  for paths in groups.values():
    stack = jnp.stack([jnp.asarray(tau_flat[p]) for p in paths])
    factors = _svd_group(stack, rank=rank, dtype=None if dtype is None else jnp.dtype(dtype))
    del stack
    for i, path in enumerate(paths):
      out[path] = SVD(factors.u[i], factors.s[i], factors.vt[i])
  return tree_util.unflatten({path: out[path] for path in tau_flat})


def reconstruct(svd: SVD) -> jax.Array:
  """(T, m, n) = u @ diag(s) @ vt per task, in float32."""
  f32 = lambda x: x.astype(jnp.float32)
  return jnp.einsum('tmr,tr,trn->tmn', f32(svd.u), f32(svd.s), f32(svd.vt))


def truncate(svd: SVD, rank: int) -> SVD:
  """The top min(rank, r) components of every task's factors."""
  if rank < 1:
    raise ValueError(f'truncate: rank={rank}; expected a positive int')
  return SVD(svd.u[..., :rank], svd.s[..., :rank], svd.vt[..., :rank, :])
