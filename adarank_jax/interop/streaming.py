"""Task vectors made and decomposed one matrix at a time, from model directories on disk.

`decompose_directories(pretrained, finetuned, ...)` gives what the in-memory path gives for fully
loaded trees,

  include = the complement of tree_util.select(base, unmerged)
  origin, tau = task_vectors.task_vectors(base, finetuned, origin=origin, include=include)
  factors = decomposition.decompose(tau, tree_util.select(tau, patterns), rank=rank, dtype=dtype)

without ever holding the T fine-tuned models or their stacked task vectors. For each leaf of the tree, in
tree order: the leaf is read (memory-mapped, one tensor at a time: `interop.safetensors_dir`) from the
pretrained directory and from every fine-tuned one, the origin leaf is made, the T deltas are written one
task at a time into one (T, ...) buffer, and that buffer goes to `decomposition.decompose`: a selected
matrix comes back as its `SVD` factors (u (T, m, k), s (T, k), vt (T, k, n)) and the buffer is dropped;
any other leaf (norms, biases, embeddings) comes back as the dense (T, ...) task vector, as `decompose`
keeps unselected leaves. A few leaves are batched into one `decompose` call when a single leaf's T
matrices would leave SVD workers idle. Peak host memory: the origin tree + the outputs + a few copies of
the largest leaf, never T models.

The arithmetic is the in-memory path's, leaf by leaf: the same jitted `leaf - origin` cast to the origin's
dtype (XLA on CPU flushes subnormals; numpy would not), the CART mean summed task by task in float32 in
the order `task_vectors` sums it, and the same per-matrix SVD. On the host SVD path (`decomposition`'s
default on CPU) the result equals the in-memory one bit for bit; on the XLA path equal-shape matrices are
stacked per call, fewer than in memory, which may change the factors by float32 rounding.

Every input is checked before anything is computed: each directory's headers against its config.json
(`safetensors_dir.open_dir`), every fine-tuned directory against the pretrained one
(`safetensors_dir.check_same_architecture`), then every tensor for NaN/Inf, one at a time.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax.core import decomposition, task_vectors, tree_util
from adarank_jax.interop import safetensors_dir
from adarank_jax.interop import state_dict as state_dict_lib

# The attention and MLP kernels of every decoder layer: the matrices decomposed and masked (the rule the
# official code applies to its transformers: every weight matrix of a block). Paths of the causal-LM and
# classifier trees (model/layers/...) and of the bare model (layers/...).
DECODER_DECOMPOSE = (
  r"(model/)?layers/\d+/self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel",
  r"(model/)?layers/\d+/mlp/(gate_proj|up_proj|down_proj)/kernel",
)
BATCH_BYTES = 256 * 2**20  # flush the pending task vectors to `decompose` beyond this many bytes


@jax.jit
def _delta(leaf: jax.Array, origin: jax.Array) -> jax.Array:
  """One task's row of `task_vectors._deltas`: leaf - origin in the origin's dtype."""
  return (leaf - origin).astype(origin.dtype)


@jax.jit
def _first(leaf: jax.Array) -> jax.Array:
  return 0 + leaf.astype(jnp.float32)  # `sum` starts from 0, as `task_vectors._mean`


@jax.jit
def _add(total: jax.Array, leaf: jax.Array) -> jax.Array:
  return total + leaf.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("count", "dtype"))
def _divide(total: jax.Array, *, count: int, dtype: Any) -> jax.Array:
  return (total / count).astype(dtype)


def _average(models: Sequence[safetensors_dir.ModelDir], path: str, *, check: bool) -> np.ndarray:
  """theta_avg of one leaf, read one model at a time (`task_vectors.weight_average`'s arithmetic)."""
  total, dtype = None, None
  for model in models:
    leaf = model.read(path, check_finite=check)
    if total is None:
      total, dtype = _first(leaf), leaf.dtype
    else:
      total = _add(total, leaf)
    del leaf
  return np.asarray(_divide(total, count=len(models), dtype=dtype))


def _deltas(
  origin: np.ndarray, models: Sequence[safetensors_dir.ModelDir], path: str, *, check: bool
) -> np.ndarray:
  """(T, ...) theta_t - origin of one leaf, filled one task at a time (aligned, so JAX can alias it)."""
  out = decomposition._aligned_empty((len(models),) + origin.shape, origin.dtype)  # pylint: disable=protected-access
  origin_array = jnp.asarray(origin)
  for t, model in enumerate(models):
    out[t] = np.asarray(_delta(model.read(path, check_finite=check), origin_array))
  return out


def _as_jax(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return jax.device_put(value, may_alias=True)  # no copy on CPU for an aligned buffer
  return value


def open_directories(
  pretrained: str | os.PathLike,
  finetuned: Sequence[str | os.PathLike],
  *,
  check_finite: bool = True,
  progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, desc: items,
) -> tuple[safetensors_dir.ModelDir, list[safetensors_dir.ModelDir]]:
  """Opens and checks the pretrained and the fine-tuned directories; reads tensor data only for NaN/Inf.

  Args:
    pretrained: HF decoder directory of the pretrained model.
    finetuned: the T >= 1 fine-tuned directories.
    check_finite: read every tensor of every directory once, one at a time, for NaN/Inf.
    progress: wraps the iteration over the directories, given the phase ('open', 'check_finite').

  Raises:
    state_dict.CheckpointError, ValueError, tree_util.StructureError: see `safetensors_dir.open_dir`.
    tree_util.StructureError: a fine-tuned directory's architecture differs from the pretrained one's.
    tree_util.NonFiniteError: NaN or Inf in a tensor (naming its file and key).
  """
  if not finetuned:
    raise ValueError("decompose_directories: got no fine-tuned directories; expected at least one")
  models = [safetensors_dir.open_dir(d) for d in progress([pretrained, *finetuned], "open")]
  for model in models[1:]:
    safetensors_dir.check_same_architecture(models[0], model)
  if check_finite:
    for model in progress(models, "check_finite"):
      safetensors_dir.check_finite(model)
  return models[0], models[1:]


def decompose_directories(
  pretrained: str | os.PathLike,
  finetuned: Sequence[str | os.PathLike],
  *,
  decompose: Sequence[str] = DECODER_DECOMPOSE,
  unmerged: Sequence[str] = (),
  origin: str = "pretrained",
  rank: int | None = None,
  dtype: Any = None,
  method: str = "auto",
  workers: int | None = None,
  check_finite: bool = True,
  progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, desc: items,
) -> tuple[dict[Any, Any], dict[Any, Any]]:
  """(origin tree, factor tree) of T fine-tuned decoder directories, made one leaf at a time.

  Args:
    pretrained: HF decoder directory (config.json + model.safetensors, or sharded) of theta_0.
    finetuned: T >= 1 directories of fine-tuned models with the pretrained model's architecture.
    decompose: regexes of the tree paths whose task vectors are decomposed (`tree_util.select`); each
      must be a matrix. The others stay dense.
    unmerged: regexes of the leaves that get no task vector: they stay at the origin (`task_vectors`'
      `include` is their complement).
    origin: 'pretrained' (Task Arithmetic) or 'average' (CART), as in `task_vectors.task_vectors`.
    rank, dtype, method, workers: as in `decomposition.decompose`.
    check_finite: scan every tensor for NaN/Inf before computing anything; False checks each tensor only
      when it is read (an error may then come after earlier leaves were decomposed).
    progress: wraps the iterations, given the phase ('open', 'check_finite', 'decompose'): e.g.
      `lambda it, desc: tqdm.tqdm(it, desc=desc)`.

  Returns:
    `(origin_tree, factors)`: origin_tree has the pretrained tree's structure (numpy leaves); factors
    holds, for each float leaf not `unmerged`, `SVD` factors where `decompose` selects it and the dense
    (T, ...) task vector elsewhere, in tree order: what `decomposition.decompose(task_vectors(...))`
    returns.

  Raises:
    ValueError: unknown `origin`, no fine-tuned directories, `decompose` selects no leaf that gets a
      task vector, or a selected leaf is not a matrix.
    state_dict.CheckpointError, tree_util.StructureError, tree_util.NonFiniteError: bad inputs (see
      `open_directories`), before any compute.
  """
  if origin not in task_vectors.ORIGINS:
    raise ValueError(f"decompose_directories: origin={origin!r}; expected one of {task_vectors.ORIGINS}")
  base, tuned = open_directories(pretrained, finetuned, check_finite=check_finite, progress=progress)
  selected, excluded = [re.compile(p) for p in decompose], [re.compile(p) for p in unmerged]
  is_float = {path: state_dict_lib.is_floating(leaf.dtype) for path, leaf in base.abstract.items()}
  merged = [p for p in base.abstract if is_float[p] and not any(r.fullmatch(p) for r in excluded)]
  select = {path: any(r.fullmatch(path) for r in selected) for path in merged}
  if not any(select.values()):
    raise ValueError(
      f"decompose_directories: decompose={tuple(decompose)} selects no matrix of the merged tree; its "
      f"paths look like {merged[:3]}"
    )
  not_matrix = sorted(p for p, s in select.items() if s and len(base.abstract[p].shape) != 2)
  if not_matrix:
    raise ValueError(f"decompose_directories: selected leaves {not_matrix} are not matrices")
  merged_set = set(merged)
  num_workers = workers or decomposition.default_workers()
  check = not check_finite  # scanned already, or checked as read
  origin_flat: dict[str, Any] = {}
  outputs: dict[str, Any] = {}
  pending: dict[str, np.ndarray] = {}

  def flush() -> None:
    if not pending:
      return
    factors = decomposition.decompose(
      dict(pending), {p: select[p] for p in pending}, rank=rank, dtype=dtype, method=method, workers=workers
    )
    pending.clear()
    outputs.update({path: _as_jax(value) for path, value in tree_util.flatten(factors).items()})

  for path in progress(list(base.abstract), "decompose"):
    if not is_float[path]:
      origin_flat[path] = base.read(path, check_finite=check)  # integer leaves keep the pretrained value
      continue
    if origin == "average":
      origin_flat[path] = _average(tuned, path, check=check)
    else:
      origin_flat[path] = base.read(path, check_finite=check)
    if path not in merged_set:
      continue
    pending[path] = _deltas(origin_flat[path], tuned, path, check=check)
    matrices = sum(len(tuned) for p in pending if select[p])
    if matrices >= num_workers or sum(x.nbytes for x in pending.values()) >= BATCH_BYTES:
      flush()
  flush()
  return tree_util.unflatten(origin_flat), tree_util.unflatten({path: outputs[path] for path in merged})
