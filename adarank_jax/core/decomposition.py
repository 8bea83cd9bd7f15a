"""Per-task thin SVD of selected task-vector matrices (docs/algorithm.md, section 3, "Decomposition").

For each selected leaf tau of shape (T, m, n): tau_t = U_t diag(s_t) V_t^T with r = min(m, n)
components (torch.linalg.svd(full_matrices=False) in the reference code), optionally truncated to
the top `rank`. Leaves that are not selected stay dense (T, ...) task vectors.

Two ways to compute it (`method`, resolved by `resolve_method`):
  'host' (default on a CPU backend): LAPACK gesdd (scipy's, called so that it releases the GIL),
      one matrix at a time in a pool of `workers` threads with single-threaded BLAS, each thread
      writing straight into preallocated output arrays. Every matrix is decomposed in its tall orientation
      (tau_t^T when m < n). Peak memory: the factors plus about two matrices per worker. On the
      2-core dev machine this beats both XLA's SVD and batched torch.linalg.svd (see
      `adarank_jax.benchmarks.svd`).
  'xla' (default on GPU/TPU): equal-shape leaves are stacked and decomposed by ONE jitted call,
      vmapped over (layer, task), on the device.
Both give float32 math, descending singular values and the same U diag(s) V^T; singular vectors
may differ by sign (and within repeated singular values).

Streaming: `decompose_streaming` takes the task vectors one task at a time (an iterable of
per-task trees), so the stacked (T, ...) task vectors never have to exist; `decompose` is the
same machinery fed one chunk that holds every task.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.linalg.cython_lapack
import threadpoolctl

from adarank_jax.core import tree_util

METHODS = ("auto", "host", "xla")


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


def resolve_method(method: str, backend: str | None = None) -> str:
  """'host' or 'xla': `method` itself, or for 'auto' 'host' on a CPU backend and 'xla' elsewhere.

  Args:
    method: one of METHODS.
    backend: a JAX platform name ('cpu', 'gpu', 'tpu'); None means `jax.default_backend()`.
  """
  if method not in METHODS:
    raise ValueError(f"decompose: method={method!r}; expected one of {METHODS}")
  if method != "auto":
    return method
  return "host" if (backend or jax.default_backend()) == "cpu" else "xla"


def default_workers() -> int:
  """Host-path threads: the CPUs this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decompose(
  tau: Mapping[Any, Any],
  select: Mapping[Any, Any],
  *,
  rank: int | None = None,
  dtype: Any = None,
  method: str = "auto",
  workers: int | None = None,
) -> dict[Any, Any]:
  """SVD factors where `select` is True, dense task vectors elsewhere.

  Args:
    tau: task-vector tree, leaves (T, ...) (from `task_vectors.task_vectors`).
    select: bool tree covering every path of `tau` (e.g. `tree_util.select(tau, patterns)`;
      extra paths are ignored). Selected leaves must be (T, m, n).
    rank: keep only the top `rank` components (min(rank, min(m, n))); None keeps all r = min(m, n).
    dtype: storage dtype of every returned array (e.g. jnp.bfloat16); None keeps tau's dtype.
      The SVD itself always runs in float32.
    method: 'auto', 'host' or 'xla' (see the module docstring and `resolve_method`).
    workers: threads of the host path; None means `default_workers()`. Ignored by 'xla'.

  Returns:
    A tree with tau's structure: `SVD` leaves (u (T,m,k), s (T,k), vt (T,k,n)) where selected,
    the tau leaf (cast to `dtype`) elsewhere.

  Raises:
    ValueError: `select` misses a path of `tau`, a selected leaf is not (T, m, n), leaves disagree
      on T, rank < 1, or `method` is unknown.
  """
  tau_flat = tree_util.flatten(tau)
  return _decompose(
    [tau_flat],
    select,
    num_tasks=_chunk_size(tau_flat),
    rank=rank,
    dtype=dtype,
    method=method,
    workers=workers,
  )


def decompose_streaming(
  select: Mapping[Any, Any],
  task_vectors: Iterable[Mapping[Any, Any]],
  *,
  num_tasks: int,
  rank: int | None = None,
  dtype: Any = None,
  method: str = "auto",
  workers: int | None = None,
) -> dict[Any, Any]:
  """`decompose` of task vectors given one task at a time; equal to `decompose(stack(...))`.

  Only one task's tree is referenced at a time (plus the growing outputs), so `task_vectors` can
  be a generator that builds tau_t = theta_t - origin (or loads it) on demand.

  Args:
    select: bool tree covering every path of the per-task trees (extra paths are ignored), e.g.
      `tree_util.select(origin, patterns)`. Selected leaves must be (m, n) per task.
    task_vectors: an iterable of exactly `num_tasks` trees tau_t, each with the same paths and
      shapes and leaves WITHOUT the task axis (numpy or jax arrays).
    num_tasks: T, the length of `task_vectors` (the outputs are allocated up front).
    rank, dtype, method, workers: as in `decompose`.

  Returns:
    The tree `decompose` returns for the stacked task vectors: `SVD` leaves (T, m, k) where
    selected, dense (T, ...) leaves elsewhere.

  Raises:
    ValueError: as `decompose`, or `task_vectors` does not hold exactly `num_tasks` trees of one
      structure.
  """
  if num_tasks < 1:
    raise ValueError(f"decompose_streaming: num_tasks={num_tasks}; expected a positive int")
  host = resolve_method(method) == "host"

  def chunks() -> Iterator[dict[str, Any]]:
    for tree in task_vectors:
      flat = tree_util.flatten(tree)
      del tree  # hold no task while the caller makes the next one
      yield {path: _with_task_axis(flat.pop(path), host=host) for path in list(flat)}

  return _decompose(
    chunks(), select, num_tasks=num_tasks, rank=rank, dtype=dtype, method=method, workers=workers
  )


def reconstruct(svd: SVD) -> jax.Array:
  """(T, m, n) = u @ diag(s) @ vt per task, in float32."""
  f32 = lambda x: x.astype(jnp.float32)
  return jnp.einsum("tmr,tr,trn->tmn", f32(svd.u), f32(svd.s), f32(svd.vt))


def truncate(svd: SVD, rank: int) -> SVD:
  """The top min(rank, r) components of every task's factors."""
  if rank < 1:
    raise ValueError(f"truncate: rank={rank}; expected a positive int")
  return SVD(svd.u[..., :rank], svd.s[..., :rank], svd.vt[..., :rank, :])


# ------------------------------------------------------------------------------------------------
# One implementation for both entry points: chunks of tasks, each a flat {path: (Tc, ...)} dict.


def _with_task_axis(leaf: Any, *, host: bool) -> Any:
  """(...) -> (1, ...): a view for host arrays, a device array for the XLA path."""
  if host:
    return np.asarray(leaf)[None]  # zero-copy for numpy and for CPU jax arrays
  return jnp.asarray(leaf)[None]


def _decompose(
  chunks: Iterable[Mapping[str, Any]],
  select: Mapping[Any, Any],
  *,
  num_tasks: int,
  rank: int | None,
  dtype: Any,
  method: str,
  workers: int | None,
) -> dict[Any, Any]:
  if rank is not None and rank < 1:
    raise ValueError(f"decompose: rank={rank}; expected a positive int or None")
  method = resolve_method(method)
  if workers is not None and workers < 1:
    raise ValueError(f"decompose: workers={workers}; expected a positive int or None")
  select_flat = tree_util.flatten(select)
  dtype = None if dtype is None else jnp.dtype(dtype)
  outputs = _Outputs(num_tasks, host=method == "host")
  layout: dict[str, tuple[int, ...]] | None = None  # path -> per-task shape, from the first chunk
  start = 0
  with _HostContext(method, workers) as pool:
    for chunk in chunks:
      if layout is None:
        layout = _check_first_chunk(chunk, select_flat)
      else:
        _check_chunk(chunk, layout)
      size = _chunk_size(chunk)
      if start + size > num_tasks:
        raise ValueError(f"decompose: got more than num_tasks={num_tasks} task vectors")
      svd_paths = [path for path in chunk if select_flat[path]]
      for path in chunk.keys() - set(svd_paths):
        outputs.put_dense(path, chunk[path], start, dtype)
      if pool is not None:
        _host_chunk(pool, chunk, svd_paths, start, outputs, rank=rank, dtype=dtype)
      else:
        _xla_chunk(chunk, svd_paths, start, outputs, rank=rank, dtype=dtype)
      start += size
      del chunk  # hold no task while the next one is made
  if start != num_tasks:
    raise ValueError(f"decompose: got {start} task vectors; expected num_tasks={num_tasks}")
  return tree_util.unflatten(outputs.finish(list(layout or {})))


def _check_first_chunk(
  chunk: Mapping[str, Any], select_flat: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
  missing = sorted(set(chunk) - set(select_flat))
  if missing:
    raise ValueError(f"decompose: `select` has no entry for keys {missing}")
  for path, leaf in chunk.items():
    if bool(select_flat[path]) and np.ndim(leaf) != 3:
      raise ValueError(
        f"decompose: selected key {path!r} has shape {np.shape(leaf)}; expected "
        "(tasks, m, n), a matrix per task"
      )
  return {path: tuple(np.shape(leaf)[1:]) for path, leaf in chunk.items()}


def _check_chunk(chunk: Mapping[str, Any], layout: Mapping[str, tuple[int, ...]]) -> None:
  per_task = {path: np.broadcast_to(False, np.shape(leaf)[1:]) for path, leaf in chunk.items()}
  tree_util.check_structure(layout, per_task, source="decompose (a task vector vs. the first one)")


def _chunk_size(chunk: Mapping[str, Any]) -> int:
  """The length of the leaves' common leading (task) axis."""
  scalars = sorted(path for path, leaf in chunk.items() if not np.ndim(leaf))
  if scalars:
    raise ValueError(f"decompose: leaves {scalars} have no task axis")
  sizes = {np.shape(leaf)[0] for leaf in chunk.values()}
  if len(sizes) > 1:
    raise ValueError(f"decompose: leaves disagree on the number of tasks: {sorted(sizes)}")
  return sizes.pop() if sizes else 0


class _Outputs:
  """The result arrays, filled chunk by chunk.

  Host path: 64-byte aligned numpy buffers (T, ...) that the workers write into, handed to JAX
  without a copy at the end. XLA path: a chunk that holds every task is kept as computed;
  otherwise device buffers (T, ...) are updated in place (donated dynamic_update_slice).
  """

  def __init__(self, num_tasks: int, *, host: bool):
    self.num_tasks = num_tasks
    self.host = host
    self.arrays: dict[str, Any] = {}  # path -> array or SVD of arrays

  def svd_buffers(self, path: str, m: int, n: int, k: int, dtype: Any) -> SVD:
    """The host buffers of an SVD leaf, allocated on first use."""
    if path not in self.arrays:
      t = self.num_tasks
      self.arrays[path] = SVD(
        _aligned_empty((t, m, k), dtype), _aligned_empty((t, k), dtype), _aligned_empty((t, k, n), dtype)
      )
    return self.arrays[path]

  def put_dense(self, path: str, leaf: Any, start: int, dtype: Any) -> None:
    if np.shape(leaf)[0] == self.num_tasks:  # the whole leaf at once: kept as is, as before
      self.arrays[path] = leaf if dtype is None else jnp.asarray(leaf, dtype)
    elif self.host:
      if path not in self.arrays:
        out_dtype = np.asarray(leaf).dtype if dtype is None else dtype
        self.arrays[path] = _aligned_empty((self.num_tasks,) + np.shape(leaf)[1:], out_dtype)
      self.arrays[path][start : start + np.shape(leaf)[0]] = np.asarray(leaf)
    else:
      self.put_device(path, jnp.asarray(leaf) if dtype is None else jnp.asarray(leaf, dtype), start)

  def put_device(self, path: str, value: Any, start: int) -> None:
    """Stores a device array or SVD of (Tc, ...) arrays at tasks [start, start + Tc)."""
    size = (value.u if is_svd(value) else value).shape[0]
    if size == self.num_tasks:  # every task at once: kept as computed
      self.arrays[path] = value
      return
    if path not in self.arrays:
      zeros = lambda x: jnp.zeros((self.num_tasks,) + x.shape[1:], x.dtype)
      self.arrays[path] = SVD(*map(zeros, value)) if is_svd(value) else zeros(value)
    if is_svd(value):
      self.arrays[path] = SVD(*(_write(b, v, start) for b, v in zip(self.arrays[path], value)))
    else:
      self.arrays[path] = _write(self.arrays[path], value, start)

  def finish(self, paths: list[str]) -> dict[str, Any]:
    """{path: jax array or SVD}, in `paths` order; host buffers become JAX arrays without a copy."""
    out = {}
    for path in paths:
      value = self.arrays.pop(path)
      if self.host:
        value = SVD(*map(_to_jax, value)) if is_svd(value) else _to_jax(value)
      out[path] = value
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
  """np.empty whose data is `align`-byte aligned, so that JAX on CPU can alias it."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  offset = -raw.ctypes.data % align
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _to_jax(x: Any) -> jax.Array:
  if isinstance(x, np.ndarray):
    return jax.device_put(x, may_alias=True)  # no copy on CPU for an aligned buffer
  return x


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer: jax.Array, value: jax.Array, start: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(buffer, value.astype(buffer.dtype), start, axis=0)


# ------------------------------------------------------------------------------------------------
# XLA path: equal-shape leaves of a chunk stacked and decomposed by one jitted, vmapped call.


@functools.partial(jax.jit, static_argnames=("rank", "dtype"))
def _svd_group(stack: jax.Array, *, rank: int | None, dtype: Any) -> SVD:
  """(L, T, m, n) -> SVD with u (L, T, m, k), s (L, T, k), vt (L, T, k, n), in float32 math."""
  svd = functools.partial(jnp.linalg.svd, full_matrices=False)
  factors = SVD(*jax.vmap(jax.vmap(svd))(stack.astype(jnp.float32)))
  if rank is not None:
    factors = truncate(factors, rank)
  out_dtype = stack.dtype if dtype is None else dtype
  return SVD(*(x.astype(out_dtype) for x in factors))


def _xla_chunk(
  chunk: Mapping[str, Any], paths: list[str], start: int, outputs: _Outputs, *, rank: int | None, dtype: Any
) -> None:
  groups: dict[tuple[tuple[int, ...], Any], list[str]] = {}
  for path in paths:
    groups.setdefault((np.shape(chunk[path]), jnp.result_type(chunk[path])), []).append(path)
  for group in groups.values():
    stack = jnp.stack([jnp.asarray(chunk[p]) for p in group])
    factors = _svd_group(stack, rank=rank, dtype=dtype)
    del stack
    for i, path in enumerate(group):
      outputs.put_device(path, SVD(factors.u[i], factors.s[i], factors.vt[i]), start)


# ------------------------------------------------------------------------------------------------
# Host path: LAPACK gesdd (scipy's), matrix by matrix, in a thread pool.


class _HostContext:
  """A thread pool plus single-threaded BLAS for the host path; nothing for the XLA path."""

  def __init__(self, method: str, workers: int | None):
    self.workers = (workers or default_workers()) if method == "host" else 0

  def __enter__(self) -> concurrent.futures.ThreadPoolExecutor | None:
    if not self.workers:
      return None
    # One BLAS thread per worker: the matrices are the parallelism. Multithreaded OpenBLAS inside
    # gesdd scales poorly and collapses when the cores are shared (benchmark_svd).
    self.limits = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="svd")
    return self.pool

  def __exit__(self, *exc: Any) -> None:
    if self.workers:
      self.pool.shutdown(wait=True, cancel_futures=True)
      self.limits.restore_original_limits()


def _host_chunk(
  pool: concurrent.futures.ThreadPoolExecutor,
  chunk: Mapping[str, Any],
  paths: list[str],
  start: int,
  outputs: _Outputs,
  *,
  rank: int | None,
  dtype: Any,
) -> None:
  """Decomposes every (path, task) matrix of the chunk; returns when all are written."""
  jobs = []
  for path in paths:
    leaf = np.asarray(chunk[path])  # zero-copy for numpy and CPU jax arrays
    _, m, n = leaf.shape
    k = min(m, n) if rank is None else min(rank, m, n)
    buffers = outputs.svd_buffers(path, m, n, k, leaf.dtype if dtype is None else dtype)
    for i in range(leaf.shape[0]):
      t = start + i
      jobs.append((m * n * min(m, n), path, t, leaf[i], buffers.u[t], buffers.s[t], buffers.vt[t]))
  jobs.sort(key=lambda job: -job[0])  # largest first, so the workers finish together
  futures = {pool.submit(_host_svd, *job[3:]): job[1:3] for job in jobs}
  for future in concurrent.futures.as_completed(futures):
    try:
      future.result()
    except (np.linalg.LinAlgError, ValueError) as error:
      path, t = futures[future]
      raise ValueError(
        f"decompose: the SVD of {path!r}, task {t}, failed ({error}); NaN or Inf in the task vector?"
      ) from error


def _host_svd(matrix: np.ndarray, u_out: np.ndarray, s_out: np.ndarray, vt_out: np.ndarray) -> None:
  """Thin SVD of one (m, n) matrix into the top-k views u_out (m, k), s_out (k,), vt_out (k, n)."""
  m, n = matrix.shape
  tall = matrix.T if m < n else matrix  # gesdd is fastest on the tall orientation
  try:
    u, s, vt = _sgesdd(tall)
  except np.linalg.LinAlgError:  # gesdd's rare convergence failures: retry with the QR-based gesvd
    u, s, vt = scipy.linalg.svd(
      np.asarray(tall, np.float32), full_matrices=False, check_finite=False, lapack_driver="gesvd"
    )
  if m < n:  # tau^T = U S Vt  =>  tau = Vt^T S U^T
    u, vt = vt.T, u.T
  k = s_out.shape[0]
  u_out[...] = u[:, :k]
  s_out[...] = s[:k]
  vt_out[...] = vt[:k]


@functools.cache
def _lapack(name: str) -> Any:
  """scipy's LAPACK routine `name` as a ctypes function, which releases the GIL while it runs.

  scipy.linalg.svd holds the GIL inside LAPACK, so threads calling it run one at a time; the
  routines scipy exports for Cython (`cython_lapack.__pyx_capi__`, what jaxlib uses too) do not.
  Every argument is a pointer (Fortran calling convention, 32-bit ints).
  """
  capsule = scipy.linalg.cython_lapack.__pyx_capi__[name]
  get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
  get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
  )
  signature = get_name(capsule)  # b'void (char *, int *, ...)'
  return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * (signature.count(b",") + 1))(
    get_pointer(capsule, signature)
  )


def _sgesdd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """LAPACK sgesdd(jobz='S') of an (m, n) matrix: u (m, r), s (r,), vt (r, n), r = min(m, n).

  Raises:
    np.linalg.LinAlgError: gesdd did not converge (info > 0).
    ValueError: LAPACK rejected an argument (info < 0; -4 is a NaN in the matrix).
  """
  a = np.array(matrix, dtype=np.float32, order="F")  # our copy: gesdd overwrites it
  m, n = a.shape
  r = min(m, n)
  s = np.empty(r, np.float32)
  u = np.empty((m, r), np.float32, order="F")
  vt = np.empty((r, n), np.float32, order="F")
  iwork = np.empty(8 * r, np.intc)
  info = np.zeros(1, np.intc)
  dims = np.array([m, n, max(m, 1), max(m, 1), max(r, 1)], np.intc)  # m, n, lda, ldu, ldvt
  jobz = ctypes.c_char(b"S")
  ptr = lambda x: x.ctypes.data

  def call(work: np.ndarray, lwork: np.ndarray) -> None:
    _lapack("sgesdd")(
      ctypes.addressof(jobz),
      ptr(dims),
      ptr(dims[1:]),
      ptr(a),
      ptr(dims[2:]),
      ptr(s),
      ptr(u),
      ptr(dims[3:]),
      ptr(vt),
      ptr(dims[4:]),
      ptr(work),
      ptr(lwork),
      ptr(iwork),
      ptr(info),
    )

  query = np.zeros(1, np.float32)
  call(query, np.array([-1], np.intc))  # workspace query
  lwork = int(np.ceil(query[0] * np.float32(1 + 1e-6)))  # float32 may round the size down
  call(np.empty(max(lwork, 1), np.float32), np.array([lwork], np.intc))
  if info[0] > 0:
    raise np.linalg.LinAlgError(f"gesdd did not converge (info={info[0]})")
  if info[0] < 0:
    raise ValueError(
      f"gesdd: argument {-info[0]} had an illegal value" + (" (a NaN in the matrix)" if info[0] == -4 else "")
    )
  return u, s, vt
