"""Static (training-free) merges built from the same pieces as AdaRank (docs/algorithm.md, sections 2 and 9).

Every function is pure over param trees and jittable (hyperparameters are Python values: bind them
with functools.partial before jax.jit). `origin`, `tau` and `factors` come from
`task_vectors.task_vectors` and `decomposition.decompose`; leaves of `origin` that have no task
vector (heads, integer buffers, excluded parts) are returned unchanged, and `merging.add_deltas` is
the one place an update is added to the origin.

  zero_shot(pretrained)                              theta_0
  weight_average(finetuned)                          mean_t theta_t
  task_arithmetic(origin, tau, scaling)              theta_0 + lambda sum_t tau_t           (TA)
  cart(origin, factors, scaling, rank_ratio)         theta_avg + lambda sum_t SVD_k(taubar_t) (CART)
  ties(origin, tau, density, scaling, merge)         theta_0 + lambda TIES(tau)             (TIES-merging)
  tsv_m(origin, tau, scaling, matrices)              theta_0 + alpha TSV-M(tau)             (TSV-M)
  iso_c(origin, tau, scaling, matrices)              theta_0 + alpha Iso-C(tau)             (Iso-C)
  iso_cts(origin, tau, scaling, common_fraction, ...) theta_0 + alpha Iso-CTS(tau)          (Iso-CTS)

Which leaves count as matrices (TSV-M, Iso-C, Iso-CTS), argument `matrices`:
  'decomposed' (default; the AdaRank repo's rule, docs/algorithm.md, section 9): the SVD leaves of a
      factor tree, i.e. whatever `select` the caller gave `decompose` (the attn/mlp kernels in this project).
      Every dense leaf is merged as the mean of its task vectors.
  'all_2d' (FusionBench's and the official TSV / Iso code's rule): additionally every dense leaf
      that is a matrix per task ((T, m, n)) is treated as a matrix and decomposed here.
      (The official code also skips `text_projection` by name; leave such a leaf out of `tau`,
      or use 'decomposed' with a `select` of your own.)
Kernels in this project are (in, out), the transpose of torch's nn.Linear weights. TSV-M and Iso-C
do not care (their result transposes with the input); Iso-CTS does, see its `side` argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax.core import tree_util
from adarank_jax.core.decomposition import SVD, is_svd, truncate
from adarank_jax.core.merging import add_deltas, dense_delta, svd_delta
from adarank_jax.core.task_vectors import weight_average

__all__ = [
  "MATRIX_RULES",
  "TIES_MERGES",
  "cart",
  "cart_rank",
  "iso_c",
  "iso_cts",
  "iso_cts_components",
  "iso_cts_split",
  "task_arithmetic",
  "ties",
  "tsv_m",
  "tsv_m_components",
  "tsv_rank",
  "weight_average",
  "zero_shot",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _sum_over_tasks(leaf: Any, scaling: float) -> jax.Array:
  """scaling * sum_t of a dense (T, ...) task vector or of the matrices an SVD rebuilds."""
  if is_svd(leaf):
    return svd_delta(leaf, jnp.full(leaf.s.shape, scaling, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return dense_delta(leaf, jnp.full((np.shape(leaf)[0],), scaling, jnp.float32))


def zero_shot(pretrained: Mapping[Any, Any]) -> Mapping[Any, Any]:
  """The pretrained model itself (the zero-shot row of the tables)."""
  return pretrained


def task_arithmetic(origin: Mapping[Any, Any], tau: Mapping[Any, Any], *, scaling: float) -> dict[Any, Any]:
  """Task Arithmetic: origin + scaling * sum_t tau_t, one scalar for every tensor.

  Args:
    origin: theta_0 (from `task_vectors(..., origin='pretrained')`).
    tau: dense (T, ...) task vectors, or a factor tree (SVD leaves are rebuilt at their stored rank).
    scaling: lambda (0.3 in the TA configs).
  """
  return add_deltas(origin, tau, lambda _, leaf, __: _sum_over_tasks(leaf, scaling), name="task_arithmetic")


def cart_rank(svd: SVD, rank_ratio: float) -> int:
  """CART's kept rank k = max(1, int(rank_ratio * min(m, n))) for factors of an (m, n) matrix."""
  return max(1, int(rank_ratio * min(svd.u.shape[-2], svd.vt.shape[-1])))


def cart(
  origin: Mapping[Any, Any], factors: Mapping[Any, Any], *, scaling: float, rank_ratio: float
) -> dict[Any, Any]:
  """CART: theta_avg + scaling * sum_t LR_k(taubar_t) (docs/algorithm.md, section 2).

  Args:
    origin: theta_avg (from `task_vectors(..., origin='average')`).
    factors: `decompose` of the centred task vectors taubar_t = theta_t - theta_avg at full rank.
      SVD leaves keep their top k = max(1, int(rank_ratio * min(m, n))) components; dense leaves
      are summed as they are (they sum to zero, so those tensors stay exactly the average).
    scaling: lambda (2.0 for ViT-B/32 with 8 tasks).
    rank_ratio: fraction of components kept (0.12 for ViT-B/32 with 8 tasks).
  """
  if not 0.0 < rank_ratio <= 1.0:
    raise ValueError(f"cart: rank_ratio={rank_ratio}; expected a value in (0, 1]")

  def delta(leaf: Any) -> jax.Array:
    if is_svd(leaf):
      leaf = truncate(leaf, cart_rank(leaf, rank_ratio))
    return _sum_over_tasks(leaf, scaling)

  return add_deltas(origin, factors, lambda _, leaf, __: delta(leaf), name="cart")


# --------------------------------------------------------------------------------------------------
# TIES-merging


TIES_MERGES = {"mean": 1.0, "sum": 0.3}  # disjoint merge -> its default lambda (see `ties`)


def _ties_thresholds(leaves: list[jax.Array], density: float) -> jax.Array:
  """(T,) magnitude thresholds, one per task, over ALL entries of all leaves (N in total).

  The original code's `topk_values_mask`: threshold_t = kthvalue(|tau_t|, N - int(N * density)), the
  (N - int(N * density))-th smallest magnitude (1-based), and entries with |x| >= threshold_t are
  kept: int(N * density) + 1 of them when there are no ties. At density 1 (where torch's
  kthvalue(0) would fail) the threshold is 0: everything is kept.
  """
  tasks = leaves[0].shape[0]
  size = sum(int(np.prod(leaf.shape[1:], dtype=np.int64)) for leaf in leaves)
  k = size - int(size * density)
  if k <= 0:
    return jnp.zeros((tasks,), jnp.float32)
  thresholds = []
  for t in range(tasks):  # one task at a time: the sort holds N entries, not T * N
    magnitudes = jnp.concatenate([jnp.abs(leaf[t]).ravel() for leaf in leaves])
    thresholds.append(jnp.sort(magnitudes)[k - 1])
  return jnp.stack(thresholds)


def ties(
  origin: Mapping[Any, Any],
  tau: Mapping[Any, Any],
  *,
  density: float = 0.2,
  scaling: float | None = None,
  merge: str = "mean",
) -> dict[Any, Any]:
  """TIES-merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
  Models"), matching the original TIES code as FusionBench keeps it (read there:
  `fusion_bench/method/ties_merging/ties_merging_utils.py`, "modified based on" AdaMerging's copy:
  `topk_values_mask`, `resolve_sign`, `resolve_zero_signs`, `disjoint_merge`).

  All N entries of all leaves of `tau` form one flattened task vector per task (the paper's tau_t).
  1. Trim (paper eq. "keep top-k%"): per task, threshold_t = the (N - int(N * density))-th smallest
     |tau_t| (torch `kthvalue`, 1-based); keep the entries with |tau_t| >= threshold_t, i.e.
     int(N * density) + 1 entries when there are no ties (all of them at density 1).
  2. Elect (paper: gamma_m = sgn(sum_t trimmed_t)): elected_e = sign(sum_t trimmed_{t,e}). An entry
     whose trimmed sum is exactly 0 takes the majority sign sign(sum_e elected_e), counted over the
     whole flattened vector (`resolve_zero_signs(..., 'majority')`).
  3. Disjoint merge: the trimmed values of the elected sign (elected > 0: the positive ones,
     otherwise the negative ones, as `disjoint_merge`'s torch.where), then
       merge='mean': their sum / max(their count, 1)   (the TIES paper's "disjoint mean")
       merge='sum':  their sum                          (FusionBench's default `merge_func: sum`)
  theta = origin + scaling * merged.

  Args:
    origin: theta_0.
    tau: dense task vectors (T, ...) (from `task_vectors(..., origin='pretrained')`).
    density: the top-k fraction ("threshold"/`K` in the code, k = 20% in the paper), in (0, 1].
    scaling: lambda. None: 1.0 for merge='mean' (the TIES paper's setting for its merges with the
      disjoint mean) and 0.3 for merge='sum' (FusionBench `config/method/ties_merging.yaml`).
      Results must say which pair they used.
    merge: 'mean' (default) or 'sum'.
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"ties: density={density}; expected a value in (0, 1]")
  if merge not in TIES_MERGES:
    raise ValueError(f"ties: merge={merge!r}; expected one of {sorted(TIES_MERGES)}")
  scaling = TIES_MERGES[merge] if scaling is None else scaling
  tau_flat = tree_util.flatten(tau)
  svd_keys = sorted(path for path, leaf in tau_flat.items() if is_svd(leaf))
  if svd_keys:
    raise ValueError(f"ties: expects dense task vectors; got SVD factors at {svd_keys}")
  leaves = {path: jnp.asarray(leaf).astype(jnp.float32) for path, leaf in tau_flat.items()}
  thresholds = _ties_thresholds(list(leaves.values()), density)

  trimmed, elected = {}, {}
  for path, leaf in leaves.items():
    threshold = thresholds.reshape((-1,) + (1,) * (leaf.ndim - 1))
    trimmed[path] = jnp.where(jnp.abs(leaf) >= threshold, leaf, 0.0)
    elected[path] = jnp.sign(trimmed[path].sum(0))
  majority = jnp.sign(sum(sign.sum() for sign in elected.values()))

  merged = {}
  for path, values in trimmed.items():
    sign = jnp.where(elected[path] == 0, majority, elected[path])
    chosen = jnp.where(sign > 0, values > 0, values < 0)
    total = jnp.where(chosen, values, 0.0).sum(0)
    merged[path] = total / jnp.maximum(chosen.sum(0), 1) if merge == "mean" else total

  return add_deltas(origin, tau, lambda path, _, __: scaling * merged[path], name="ties")


# --------------------------------------------------------------------------------------------------
# Shared pieces of TSV-M, Iso-C and Iso-CTS


MATRIX_RULES = ("decomposed", "all_2d")


def _check_matrices(name: str, matrices: str) -> None:
  if matrices not in MATRIX_RULES:
    raise ValueError(f"{name}: matrices={matrices!r}; expected one of {MATRIX_RULES}")


def _is_matrix(leaf: Any, matrices: str) -> bool:
  """SVD leaves always; dense (T, m, n) leaves too under the 'all_2d' rule."""
  return is_svd(leaf) or (matrices == "all_2d" and np.ndim(leaf) == 3)


def _math_dtype(*arrays: Any) -> Any:
  """float32, or float64 when an input is float64."""
  return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in arrays))


def _dense(leaf: Any) -> jax.Array:
  """(T, m, n) task matrices: the leaf itself, or u diag(s) vt rebuilt from an SVD leaf."""
  if is_svd(leaf):
    dtype = _math_dtype(*leaf)
    u, s, vt = (x.astype(dtype) for x in leaf)
    return jnp.einsum("tmr,trn->tmn", u * s[:, None, :], vt, precision=_HIGHEST)
  leaf = jnp.asarray(leaf)
  return leaf.astype(_math_dtype(leaf))


def _mean_over_tasks(leaf: Any) -> jax.Array:
  leaf = jnp.asarray(leaf)
  return leaf.astype(_math_dtype(leaf)).mean(0)


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD of a matrix or of a stack of matrices, as one 2-D `jnp.linalg.svd` per matrix.

  Never a batched SVD: jaxlib 0.10.2's CPU LAPACK kernels split a batch over XLA's intra-op thread
  pool and block on it, so a program that runs pool-size batched SVDs at once deadlocks (seen here
  on 2 cores with the leaves of a CLIP tower; fixed in later jaxlib). 2-D calls run inline.
  """
  if x.ndim == 2:
    return jnp.linalg.svd(x, full_matrices=False)
  parts = [_svd(m) for m in x]
  return tuple(jnp.stack(factor) for factor in zip(*parts))


def _polar(a: jax.Array) -> jax.Array:
  """The nearest (semi-)orthogonal matrix to `a` (polar factor): P Q^T from the thin SVD P S Q^T."""
  p, _, qt = _svd(a)
  return jnp.matmul(p, qt, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------------
# TSV-M


def tsv_rank(rank: int, tasks: int) -> int:
  """TSV-M's per-task kept rank k = max(1, floor(r / T)) for r = min(m, n) components."""
  return max(1, rank // tasks)


def _tsv_svd(leaf: Any) -> SVD:
  """TSV-M's whitened components of one matrix leaf (SVD factors, or dense (T, m, n)), per task:
  u (T, m, k) = task t's columns of U_perp, s (T, k), vt (T, k, n) = its rows of V_perp^T."""
  if is_svd(leaf):
    dtype = _math_dtype(*leaf)
    u, s, vt = (x.astype(dtype) for x in leaf)
  else:
    u, s, vt = _svd(_dense(leaf))
  tasks, m, stored = u.shape
  n = vt.shape[-1]
  k = tsv_rank(min(m, n), tasks)
  if stored < k:
    raise ValueError(
      f"tsv_m: the factors hold {stored} components; TSV-M keeps k = max(1, "
      f"min({m}, {n}) // {tasks}) = {k} per task: decompose with rank >= {k}"
    )
  u_cat = jnp.transpose(u[..., :k], (1, 0, 2)).reshape(m, tasks * k)  # (m, T*k)
  vt_cat = vt[:, :k, :].reshape(tasks * k, n)  # (T*k, n)
  u_perp = jnp.transpose(_polar(u_cat).reshape(m, tasks, k), (1, 0, 2))  # (T, m, k)
  vt_perp = _polar(vt_cat).reshape(tasks, k, n)  # (T, k, n)
  return SVD(u_perp, s[:, :k], vt_perp)


def tsv_m_components(tau: Mapping[Any, Any], *, matrices: str = "decomposed") -> dict[Any, Any]:
  """TSV-M as per-task components: sum_t of them is TSV-M's merged update at alpha = 1.

  Matrix leaves: SVD(u, s, vt) with task t's k = max(1, floor(r / T)) whitened components (the
  columns of U_perp and rows of V_perp^T that came from task t, with its own singular values), so
  sum_t u_t diag(s_t) vt_t = U_perp diag(s_cat) V_perp^T. Other leaves: tau_t / T (their sum is the
  mean). This is the base AdaRank masks on TSV-M (`methods`: adarank_tsv_m): the masks select among
  each task's whitened components, and all-on masks with every coefficient alpha give `tsv_m`.
  """
  _check_matrices("tsv_m", matrices)

  def components(leaf: Any) -> Any:
    if _is_matrix(leaf, matrices):
      return _tsv_svd(leaf)
    leaf = jnp.asarray(leaf)
    return leaf.astype(_math_dtype(leaf)) / leaf.shape[0]

  return tree_util.unflatten({path: components(leaf) for path, leaf in tree_util.flatten(tau).items()})


def tsv_m(
  origin: Mapping[Any, Any], tau: Mapping[Any, Any], *, scaling: float = 1.0, matrices: str = "decomposed"
) -> dict[Any, Any]:
  """TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
  Model Merging"), Sec. 4 (TSV-Merge), as in the official code (AntoAndGar/task_singular_vectors
  `src/utils/TSVM_utils.py` `compute_and_sum_svd_mem_reduction`; FusionBench
  `fusion_bench/method/task_singular_vector/TSVM.py`; AdaRank repo `static.py` 'TSV').

  Per matrix (m, n), r = min(m, n), T tasks:
    1. tau_t = U_t diag(s_t) V_t^T; each task keeps its top k = max(1, floor(r / T)) components
       (the code's int(r * 1/T); the AdaRank repo's max(1, int(rank_ratio * r)) with ratio 1/T).
    2. U = [U_1,k | ... | U_T,k] (m, T*k), s = [s_1,k, ..., s_T,k], V = [V_1,k | ... | V_T,k] (n, T*k).
    3. Whitening: U_perp = P_U Q_U^T from the SVD U = P_U S_U Q_U^T (the polar factor, the nearest
       matrix with orthonormal columns); V_perp likewise.
    4. merged = U_perp diag(s) V_perp^T.
  Other leaves: merged = mean_t tau_t (all three reference codes).
  theta = origin + scaling * merged (the scaling multiplies the mean too, as in all three codes).

  Identity: with T = 1 and all r components, U and V already have orthonormal columns, so their
  polar factors are U and V themselves and TSV-M returns tau exactly: theta = origin + scaling*tau.

  Args:
    origin: theta_0 (from `task_vectors(..., origin='pretrained')`).
    tau: dense task vectors, or a factor tree from `decompose` (SVD leaves are used as they are;
      they need >= k stored components, so decompose at full rank or with rank >= k).
    scaling: alpha; 1.0 (FusionBench `TaskSingularVectorMerging.yaml` `alpha: 1`; docs/algorithm.md,
      section 9).
      The official TSV code instead picks alpha on validation data from {0.1, 0.2, ..., 3.0}.
    matrices: 'decomposed' (default, the AdaRank repo's rule) or 'all_2d' (FusionBench's and the
      official code's rule); see the module docstring.
  """
  return add_deltas(
    origin,
    tsv_m_components(tau, matrices=matrices),
    lambda _, leaf, __: _sum_over_tasks(leaf, scaling),
    name="tsv_m",
  )


# --------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS


def _iso_c_delta(leaf: Any) -> jax.Array:
  total = _dense(leaf).sum(0)
  u, s, vt = _svd(total)
  return s.mean() * jnp.matmul(u, vt, precision=_HIGHEST)


def iso_c(
  origin: Mapping[Any, Any], tau: Mapping[Any, Any], *, scaling: float = 1.5, matrices: str = "decomposed"
) -> dict[Any, Any]:
  """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv:2502.04959), Sec. 4.1, as in the official code
  (danielm1405/iso-merging `src/utils/iso.py` `iso_c`; FusionBench
  `fusion_bench/method/isotropic_merging/iso_utils.py`).

  Per matrix: M = sum_t tau_t = U diag(S) V^T (thin SVD, r = min(m, n) values);
    merged = mean(S) * U V^T   (every singular value replaced by their mean: an isotropic spectrum).
  Other leaves: merged = mean_t tau_t (the code's sum(tvs) / len(tvs); only matrices are re-summed).
  theta = origin + scaling * merged (the scaling multiplies the mean too).

  Identity: if sum_t tau_t already has equal singular values, Iso-C returns it unchanged.

  Args:
    origin: theta_0.
    tau: dense task vectors, or a factor tree (SVD leaves are rebuilt as sum_t U_t diag(s_t) V_t^T,
      exact at full rank; truncated factors merge the truncated task matrices).
    scaling: alpha. The paper picks alpha per setting on held-out validation data from
      {0.1, 0.2, ..., 3.0} (official `evaluate_task_vector`: linspace(0, 3, 31)[1:]); the default
      1.5 is FusionBench's documented value for CLIP ViT-B/32 on the 8 tasks
      (`docs/algorithms/isotropic_merging.md`, `config/method/singular_value_calibration/iso_c.yaml`);
      FusionBench's plain config default is 1.0. The paper's own per-model table was not checked.
    matrices: 'decomposed' (default) or 'all_2d' (the official code's rule); see the module docstring.
  """
  _check_matrices("iso_c", matrices)

  def delta(leaf: Any) -> jax.Array:
    return scaling * (_iso_c_delta(leaf) if _is_matrix(leaf, matrices) else _mean_over_tasks(leaf))

  return add_deltas(origin, tau, lambda _, leaf, __: delta(leaf), name="iso_c")


ISO_SIDES = ("out", "in")


def iso_cts_split(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
  """(k_c, s): common directions and task-specific directions per task, with k_c + T * s = r.

  The official code's rounding: k_c = int(r * f); T * s = round((r - k_c) / T) * T (Python's
  round, half to even); then k_c = r - T * s. So k_c can move by up to T / 2 from int(r * f), and
  every one of the r directions is used.
  """
  common = int(rank * common_fraction)
  per_task = round((rank - common) / tasks)
  common = rank - per_task * tasks
  if common < 0:
    raise ValueError(
      f"iso_cts: common_fraction={common_fraction} with r={rank} and T={tasks} "
      f"leaves {common} common directions; raise common_fraction"
    )
  return common, per_task


def _iso_cts_svd(leaf: Any, common_fraction: float, side: str) -> SVD:
  """Iso-CTS's merged matrix of one leaf as T + 1 rows of components (steps 1-7 of `iso_cts`):
  row t < T holds the s whitened directions that came from task t, row T the k_c common ones, each
  with the isotropic value mean(S_all); rows are zero-padded to max(s, k_c) components."""
  tau = _dense(leaf)  # (T, m, n)
  if side == "out":  # this project's kernels are (in, out): the paper's Delta is kernel^T
    tau = jnp.swapaxes(tau, -1, -2)
  tasks, m, n = tau.shape
  common, per_task = iso_cts_split(min(m, n), tasks, common_fraction)
  u, s, vt = _svd(tau.sum(0))
  u_c, s_c, vt_c = u[:, :common], s[:common], vt[:common]
  if per_task:
    # Task-specific directions: tau_t minus its projection onto the common left subspace.
    projected = tau - jnp.einsum(
      "mk,tkn->tmn", u_c, jnp.einsum("mk,tmn->tkn", u_c, tau, precision=_HIGHEST), precision=_HIGHEST
    )
    u_t, s_t, vt_t = _svd(projected)
    u_all = jnp.concatenate(
      [jnp.transpose(u_t[..., :per_task], (1, 0, 2)).reshape(m, tasks * per_task), u_c], axis=1
    )
    s_all = jnp.concatenate([s_t[:, :per_task].reshape(-1), s_c])
    vt_all = jnp.concatenate([vt_t[:, :per_task, :].reshape(tasks * per_task, n), vt_c], axis=0)
  else:
    u_all, s_all, vt_all = u_c, s_c, vt_c
  u_perp, vt_perp = _polar(u_all), _polar(vt_all)
  width = max(per_task, common)
  starts = [t * per_task for t in range(tasks)] + [tasks * per_task]
  sizes = [per_task] * tasks + [common]

  def rows(x, axis):  # (T + 1, ...) blocks of x along `axis`, each zero-padded to `width`
    blocks = [jax.lax.slice_in_dim(x, a, a + size, axis=axis) for a, size in zip(starts, sizes)]
    padding = [[(0, 0)] * x.ndim for _ in blocks]
    for pad, size in zip(padding, sizes):
      pad[axis] = (0, width - size)
    return jnp.stack([jnp.pad(b, pad) for b, pad in zip(blocks, padding)])

  u_rows, vt_rows = rows(u_perp, 1), rows(vt_perp, 0)  # (T+1, m, w), (T+1, w, n)
  s_rows = rows(jnp.full((tasks * per_task + common,), s_all.mean(), s_all.dtype), 0)
  if side == "out":  # back to the (in, out) kernel layout: (U V^T)^T = V U^T
    return SVD(jnp.swapaxes(vt_rows, -1, -2), s_rows, jnp.swapaxes(u_rows, -1, -2))
  return SVD(u_rows, s_rows, vt_rows)


def iso_cts_components(
  tau: Mapping[Any, Any], *, common_fraction: float = 0.8, side: str = "out", matrices: str = "decomposed"
) -> dict[Any, Any]:
  """Iso-CTS as T + 1 rows of components: their sum is Iso-CTS's merged update at alpha = 1.

  Matrix leaves: SVD leaves with T + 1 rows (`_iso_cts_svd`): row t < T the task-specific
  directions of task t, row T the common subspace, every component with the isotropic singular
  value. Other leaves: T + 1 rows tau_t / T and a zero row (their sum is the mean). This is the base
  AdaRank masks on Iso-CTS (`methods`: adarank_iso_cts), with one extra mask row and coefficient for
  the common directions; all-on masks with every coefficient alpha give `iso_cts`.
  """
  _check_matrices("iso_cts", matrices)
  if not 0.0 <= common_fraction <= 1.0:
    raise ValueError(f"iso_cts: common_fraction={common_fraction}; expected a value in [0, 1]")
  if side not in ISO_SIDES:
    raise ValueError(f"iso_cts: side={side!r}; expected one of {ISO_SIDES}")

  def components(leaf: Any) -> Any:
    if _is_matrix(leaf, matrices):
      return _iso_cts_svd(leaf, common_fraction, side)
    leaf = jnp.asarray(leaf)
    leaf = leaf.astype(_math_dtype(leaf)) / leaf.shape[0]
    return jnp.concatenate([leaf, jnp.zeros_like(leaf[:1])])

  return tree_util.unflatten({path: components(leaf) for path, leaf in tree_util.flatten(tau).items()})


def iso_cts(
  origin: Mapping[Any, Any],
  tau: Mapping[Any, Any],
  *,
  scaling: float = 1.5,
  common_fraction: float = 0.8,
  side: str = "out",
  matrices: str = "decomposed",
) -> dict[Any, Any]:
  """Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common
  and Task-Specific Subspaces", arXiv:2502.04959), Sec. 4.2, following the official code step by
  step (danielm1405/iso-merging `src/utils/iso.py` `iso_cts`; identical in FusionBench
  `fusion_bench/method/isotropic_merging/iso_utils.py`).

  Per matrix Delta_t (m, n) in the paper's (out, in) layout, r = min(m, n), T tasks:
    1. M = sum_t Delta_t = U diag(S) V^T.
    2. Sizes (`iso_cts_split`): k_c = int(r * common_fraction); s = round((r - k_c) / T);
       k_c = r - T * s (so k_c + T * s = r exactly).
    3. Common subspace: U_c = U[:, :k_c], S_c = S[:k_c], V_c = V[:, :k_c].
    4. Task-specific: Delta_t' = Delta_t - U_c U_c^T Delta_t (projected off the common LEFT
       subspace only); Delta_t' = U_t' diag(S_t') V_t'^T; task t contributes its top s of each.
    5. U_all = [U_1',s | ... | U_T',s | U_c] (m, r), S_all likewise (r values: each task's top s
       singular values of Delta_t' and the k_c top singular values of M), V_all likewise (n, r).
    6. Orthogonalise: U_perp = polar factor P Q^T of U_all (SVD P S Q^T); V_perp likewise.
    7. merged = mean(S_all) * U_perp V_perp^T (isotropic spectrum: the mean of all r values of 5).
  Other leaves: merged = mean_t tau_t (the code's running average). theta = origin + scaling*merged.

  Identity: with common_fraction = 1, k_c = r and s = 0: U_all = U is already orthogonal and
  mean(S_all) = mean(S), so Iso-CTS equals Iso-C.

  Args:
    origin: theta_0.
    tau: dense task vectors, or a factor tree (SVD leaves are rebuilt per task, exact at full rank).
    scaling: alpha; see `iso_c` (the same validation grid in the paper; 1.5 is FusionBench's
      documented ViT-B/32 8-task value, `config/method/singular_value_calibration/iso_cts.yaml`;
      FusionBench's plain config default is 1.0).
    common_fraction: the fraction of r spent on the common subspace; 0.8 (official README and
      `config/method/iso_cts.yaml`, FusionBench `iso_cts.yaml`).
    side: which space the common subspace is removed from (step 4), the only step that is not
      transpose-symmetric. 'out' (default): the output space, the left side of the paper's and
      torch nn.Linear's (out, in) matrices = the right side of this project's (in, out) kernels, so
      it reproduces the official code on CLIP/RoBERTa weights. 'in': the left side of the kernels
      as stored here (the input space); that is what the torch code does on HF GPT-2 Conv1D weights,
      which torch also stores as (in, out).
    matrices: 'decomposed' (default) or 'all_2d' (the official code's rule); see the module docstring.
  """
  components = iso_cts_components(tau, common_fraction=common_fraction, side=side, matrices=matrices)
  return add_deltas(origin, components, lambda _, leaf, __: _sum_over_tasks(leaf, scaling), name="iso_cts")
