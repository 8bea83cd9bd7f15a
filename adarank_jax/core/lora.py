"""LoRA adapters as task vectors, and their thin SVD computed from the factors (never the dense product).

A LoRA adapter of a torch Linear weight W (n_out, n_in) has factors A (r, n_in) and B (n_out, r) and
changes W by scale * B @ A, where scale = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's
`use_rslora`). Our kernels are (n_in, n_out) (`interop.keymap.LINEAR` transposes torch weights), so
the task vector of the kernel is the transpose:

  tau = scale * (B @ A)^T = scale * A^T @ B^T                                       (n_in, n_out)

Its thin SVD comes from two QR decompositions and the SVD of a small core:

  A^T = Q_A R_A, B = Q_B R_B   =>   tau = Q_A (scale R_A R_B^T) Q_B^T,   scale R_A R_B^T = U_c S V_c^T
  u = Q_A U_c (n_in, k),  s = S (k,),  vt = V_c^T Q_B^T (k, n_out),   k = min(r, n_in, n_out)

(in torch's orientation W = U S V^T has U = Q_B V_c and V = Q_A U_c). This costs O((n_in + n_out) r^2),
and the factors have the form `decomposition.SVD` gives a selected leaf: u, s, vt with descending s,
float32 math, the top k components (k = r unless a side is narrower: a rank-r matrix has at most r non-zero
singular values, so they equal `decomposition.truncate(decompose(tau), r)` up to the signs of singular
vectors). A rank-deficient adapter gives trailing zero singular values, with orthonormal vectors still.

Leading axes broadcast: a (..., r, n_in) and b (..., n_out, r) with a task axis give SVD leaves of
shapes (T, n_in, k), (T, k), (T, k, n_out), as `decomposition.decompose` lays them out.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from adarank_jax.core.decomposition import SVD


def scaling(alpha: float, r: int, *, use_rslora: bool) -> float:
  """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  if r < 1:
    raise ValueError(f"lora: r={r}; expected a positive int")
  return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check(a: jax.Array, b: jax.Array, r: int) -> None:
  if a.ndim < 2 or b.ndim < 2 or a.shape[-2] != r or b.shape[-1] != r or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(
      f"lora: factors of shapes A {tuple(a.shape)}, B {tuple(b.shape)} for r={r}; expected "
      "A (..., r, n_in) and B (..., n_out, r) with the same leading axes"
    )


def densify(a: Any, b: Any, *, alpha: float, r: int, use_rslora: bool) -> jax.Array:
  """The dense task vector scale * A^T @ B^T, (..., n_in, n_out) in float32 (for small layers and tests).

  Args:
    a: LoRA A, (..., r, n_in) (PEFT's lora_A.weight).
    b: LoRA B, (..., n_out, r) (PEFT's lora_B.weight).
    alpha, r, use_rslora: the adapter's lora_alpha, r and use_rslora (see `scaling`).
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  _check(a, b, r)
  return scaling(alpha, r, use_rslora=use_rslora) * jnp.swapaxes(b @ a, -1, -2)


def decompose(a: Any, b: Any, *, alpha: float, r: int, use_rslora: bool, dtype: Any = None) -> SVD:
  """Thin SVD of `densify(a, b, ...)` from the factors (QR of A^T and of B, SVD of the r x r core).

  Args:
    a: LoRA A, (..., r, n_in).
    b: LoRA B, (..., n_out, r).
    alpha, r, use_rslora: as in `densify`.
    dtype: storage dtype of the factors; None keeps float32. The math is always float32.

  Returns:
    SVD with u (..., n_in, k), s (..., k) descending, vt (..., k, n_out), k = min(r, n_in, n_out).

  Raises:
    ValueError: the shapes are not A (..., r, n_in) and B (..., n_out, r), or r < 1.
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  _check(a, b, r)
  return _decompose(
    a, b, jnp.float32(scaling(alpha, r, use_rslora=use_rslora)), jnp.dtype(dtype or jnp.float32)
  )


@jax.jit(static_argnames="dtype")
def _decompose(a: jax.Array, b: jax.Array, scale: jax.Array, dtype: Any) -> SVD:
  q_a, r_a = jnp.linalg.qr(jnp.swapaxes(a, -1, -2))  # (n_in, ka), (ka, r)
  q_b, r_b = jnp.linalg.qr(b)  # (n_out, kb), (kb, r)
  # the (ka, kb) core; ka = min(r, n_in), kb = min(r, n_out), so it has k = min(ka, kb) components
  u_c, s, vt_c = jnp.linalg.svd(scale * r_a @ jnp.swapaxes(r_b, -1, -2), full_matrices=False)
  u, vt = q_a @ u_c, vt_c @ jnp.swapaxes(q_b, -1, -2)
  return SVD(u.astype(dtype), s.astype(dtype), vt.astype(dtype))
