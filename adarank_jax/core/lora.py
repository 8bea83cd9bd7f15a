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

T adapters of one base tree (`Task`, one per fine-tuned input) give the run's inputs (experiment/run.py):
  `Adapted`          the fine-tuned trees theta_t = theta_0 + tau_t, each made when it is read
  `task_vectors`     the dense (T, n_in, n_out) task vectors of every targeted kernel (a dense matrix
                     per task, for the methods that need tau itself)
  `factors`          their SVD factors from the adapters' own factors (rank r, never the dense product)
Kernels no adapter targets have a zero task vector: they are absent from tau and the factors, so the
merge keeps their origin value (`merging.merge` merges only the leaves it is given). A kernel that some
adapters target and others do not has zero rows for the others (zero task vectors, zero factors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adarank_jax.core import tree_util
from adarank_jax.core.decomposition import SVD


class Task(NamedTuple):
  """One LoRA adapter as a task vector: tau = scale * A^T @ B^T at every kernel it targets.

  Attributes:
    factors: flat tree path of a kernel (n_in, n_out) -> (A (r, n_in), B (n_out, r)).
    scale: `scaling(lora_alpha, r, use_rslora=...)`.
    r: the adapter's rank.
  """

  factors: Mapping[str, tuple[Any, Any]]
  scale: float
  r: int


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


def _tau(task: Task, path: str) -> jax.Array:
  """Task `task`'s dense float32 task vector at `path` (its kernel's shape)."""
  a, b = (jnp.asarray(x, jnp.float32) for x in task.factors[path])
  return task.scale * (a.T @ b.T)


def _targeted(base_flat: Mapping[str, Any], tasks: Sequence[Task], include: Mapping[Any, Any] | None):
  """The kernel paths some adapter targets and `include` keeps, in the base's order; every factor's
  shapes checked against its base kernel."""
  if not tasks:
    raise ValueError("lora: got no adapters; expected at least one")
  include_flat = tree_util.flatten(include) if include is not None else None
  problems = []
  for t, task in enumerate(tasks):
    for path, (a, b) in task.factors.items():
      want = tuple(base_flat[path].shape) if path in base_flat else None
      if want is None or len(want) != 2 or a.shape != (task.r, want[0]) or b.shape != (want[1], task.r):
        problems.append(
          f"adapter {t}: {path}: A {tuple(a.shape)}, B {tuple(b.shape)} for r={task.r}; the base tree has "
          + (f"a {want} kernel there" if want is not None else "no leaf there")
        )
  if problems:
    raise tree_util.StructureError("lora: " + "; ".join(problems))
  union = {path for task in tasks for path in task.factors}
  return [p for p in base_flat if p in union and (include_flat is None or bool(include_flat[p]))]


class Adapted(Sequence):
  """The T fine-tuned trees of LoRA adapters of `base`: tree t = base + tau_t (float32 math, cast to each
  leaf's dtype), made when it is read, so holding them costs the adapters' factors alone.

  Attributes:
    base: the pretrained tree theta_0.
    tasks: one `Task` per fine-tuned input.
  """

  def __init__(self, base: Mapping[Any, Any], tasks: Sequence[Task]):
    self.base, self.tasks = base, tuple(tasks)
    _targeted(tree_util.flatten(base), self.tasks, None)

  def __len__(self) -> int:
    return len(self.tasks)

  def __getitem__(self, t):
    if isinstance(t, slice):
      return [self[i] for i in range(len(self))[t]]
    task = self.tasks[t]
    flat = tree_util.flatten(self.base)
    for path in task.factors:
      flat[path] = (jnp.asarray(flat[path], jnp.float32) + _tau(task, path)).astype(flat[path].dtype)
    return tree_util.unflatten(flat)


def task_vectors(
  base: Mapping[Any, Any], tasks: Sequence[Task], *, origin: str, include: Mapping[Any, Any] | None = None
) -> tuple[dict[Any, Any], dict[Any, Any]]:
  """Origin and stacked dense task vectors of T adapters, as `task_vectors.task_vectors` gives them for
  the fine-tuned trees `Adapted(base, tasks)`, with the math in float32 from the factors.

  Args:
    base: pretrained tree theta_0.
    tasks: one `Task` per fine-tuned input.
    origin: 'pretrained' (origin = theta_0, tau_t from the factors) or 'average' (CART: origin = theta_0 +
      mean_t tau_t, the centred tau_t - mean_s tau_s).
    include: optional bool tree over `base`; only kernels marked True get a task vector (the origin is
      computed for every kernel regardless, as `task_vectors.task_vectors` does).

  Returns:
    `(origin_tree, tau)`: tau holds (T, n_in, n_out) in the base kernel's dtype at every kernel some
    adapter targets (and `include` keeps), zeros for the adapters that do not target it; every other
    leaf is absent (a zero task vector) and the origin keeps theta_0 there.
  """
  if origin not in ("pretrained", "average"):
    raise ValueError(f"lora.task_vectors: origin={origin!r}; expected 'pretrained' or 'average'")
  base_flat = tree_util.flatten(base)
  included = set(_targeted(base_flat, tasks, include))
  origin_flat, tau_flat = dict(base_flat), {}
  for path in _targeted(base_flat, tasks, None):  # the origin of every leaf, as task_vectors gives it
    leaf = base_flat[path]
    if origin == "pretrained" and path not in included:
      continue
    zero = jnp.zeros(leaf.shape, jnp.float32)
    stack = jnp.stack([_tau(task, path) if path in task.factors else zero for task in tasks])
    if origin == "average":
      mean = stack.mean(0)
      origin_flat[path] = (jnp.asarray(leaf, jnp.float32) + mean).astype(leaf.dtype)
      stack = stack - mean
    if path in included:
      tau_flat[path] = stack.astype(leaf.dtype)
  return tree_util.unflatten(origin_flat), tree_util.unflatten(tau_flat)


def factors(
  base: Mapping[Any, Any],
  tasks: Sequence[Task],
  *,
  select: Mapping[Any, Any],
  include: Mapping[Any, Any] | None = None,
  rank: int | None = None,
  dtype: Any = None,
) -> dict[Any, Any]:
  """The factor tree `decomposition.decompose` gives for `task_vectors(base, tasks, origin='pretrained')`,
  computed from the adapters' factors (`decompose`): the dense product is never formed where `select`.

  Args:
    base: pretrained tree theta_0.
    tasks: one `Task` per fine-tuned input.
    select: bool tree over `base`: SVD factors where True, dense task vectors (T, n_in, n_out) elsewhere.
    include: optional bool tree over `base`; only kernels marked True are in the result.
    rank: keep the top `rank` components (None: all of them).
    dtype: storage dtype of every array; None keeps the base leaf's dtype (the math is float32).

  Returns:
    At every kernel some adapter targets (and `include` keeps): SVD leaves u (T, n_in, k), s (T, k),
    vt (T, k, n_out), k = min(rank, max_t r_t, n_in, n_out), an adapter of smaller rank (or that does not
    target the kernel) padded with zero components; or the dense task vectors where `select` is False.
  """
  if rank is not None and rank < 1:
    raise ValueError(f"lora.factors: rank={rank}; expected a positive int or None")
  base_flat, select_flat = tree_util.flatten(base), tree_util.flatten(select)
  out = {}
  for path in _targeted(base_flat, tasks, include):
    leaf = base_flat[path]
    cast = jnp.dtype(dtype or leaf.dtype)
    if not select_flat[path]:
      zero = jnp.zeros(leaf.shape, jnp.float32)
      out[path] = jnp.stack([_tau(task, path) if path in task.factors else zero for task in tasks]).astype(
        cast
      )
      continue
    k = min(max(task.r for task in tasks if path in task.factors), *leaf.shape, rank or math.inf)
    rows = []
    for task in tasks:
      if path in task.factors:
        a, b = (jnp.asarray(x, jnp.float32) for x in task.factors[path])
        svd = _decompose(a, b, jnp.float32(task.scale), jnp.dtype(jnp.float32))
        pad = k - min(k, svd.s.shape[-1])
        rows.append(
          SVD(
            jnp.pad(svd.u[:, :k], ((0, 0), (0, pad))),
            jnp.pad(svd.s[:k], (0, pad)),
            jnp.pad(svd.vt[:k], ((0, pad), (0, 0))),
          )
        )
      else:
        rows.append(SVD(jnp.zeros((leaf.shape[0], k)), jnp.zeros((k,)), jnp.zeros((k, leaf.shape[1]))))
    out[path] = SVD(*(jnp.stack(parts).astype(cast) for parts in zip(*rows)))
  return tree_util.unflatten(out)
