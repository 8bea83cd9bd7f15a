"""The training step's layout: how one and the same step is laid out on the machine it runs on.

Three choices change the program, never the math (tests hold every candidate below to the plain
step's loss, gradients and 50-step Adam trajectory at float32 rounding):

  tasks_per_forward  the tower's call size in tasks (`train.one_forward`'s tasks_per_call; 0: all
                     tasks in one call)
  remat              recompute the tower's activations in the backward pass (`jax.checkpoint`)
  cache_deltas       keep every task's masked delta between steps (`train.init_state`)

Which one is fastest depends on the machine (cache sizes, BLAS, core count, accelerator), so none
is fixed by default (`config.adarank.layout = 'auto'`):

- cache_deltas by a cost rule: on whenever the cache fits in CACHE_SHARE of the memory free on the
  device that holds it. With the cache the forward pass sums T cached deltas instead of rebuilding
  them from the factors (T*m*n additions instead of 2*T*m*n*r multiply-adds per matrix), and a delta
  is rebuilt only where a hard mask flipped, so the step never does more rebuild work than without
  it: about half on any machine whose step is dominated by the rebuild.
- the tower's layout by timing: `time_step` runs each of TOWER_LAYOUTS on the run's own inputs for a
  few steps, and `fastest` picks the quickest. A candidate whose compiled step would allocate more
  than STEP_SHARE of the free memory (`step_bytes`, XLA's memory analysis, known before it runs) is
  skipped. The caller logs the timings and stores the choice, so a resumed run uses the same layout.
  Candidates that keep the cache are checked so even when there is one: the cost rule above weighs
  the cache alone, and the step's own buffers come on top of it. Where every candidate with the cache
  is skipped, the same candidates without it (`without_cache`) are chosen among instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from adarank_jax.core.decomposition import is_svd

# The tower layouts timed by `auto`: (tasks_per_forward, remat). One task per call with remat keeps
# small calls in cache (fastest on the 2-core CPUs measured); all tasks in one call without remat
# suits a small rebuild (a window) or an accelerator.
TOWER_LAYOUTS = ((1, True), (1, False), (0, False))
CACHE_SHARE = 0.5  # the cache is kept when it needs at most this share of the free memory
STEP_SHARE = 0.8  # a timed layout whose step allocates more than this share of the free memory is skipped
MODES = ("auto", "config")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One layout of the step; see the module docstring for each field."""

  tasks_per_forward: int = 1
  remat: bool = True
  cache_deltas: bool = False

  def __str__(self) -> str:
    call = "all tasks" if self.tasks_per_forward == 0 else f"{self.tasks_per_forward} task(s)"
    return (
      f"{call} per forward call, remat {'on' if self.remat else 'off'}, "
      f"cached deltas {'on' if self.cache_deltas else 'off'}"
    )


def cache_bytes(factors: Mapping[Any, Any], *, shards: int = 1) -> int:
  """Bytes of the delta cache, per shard: per task and SVD leaf one float32 (m, n) delta and U^T
  (`merging.Cached`)."""
  total = 0
  for leaf in jax.tree.leaves(factors, is_leaf=is_svd):
    if is_svd(leaf):
      tasks, m, _ = leaf.u.shape
      total += 4 * tasks * m * leaf.vt.shape[-1] + leaf.u.size * leaf.u.dtype.itemsize
  return -(-total // shards)


def free_bytes(device: jax.Device) -> int | None:
  """Memory free on `device`: the allocator's limit minus what is in use where it reports them
  (accelerators), else the host's available memory (Linux /proc/meminfo, or free pages)."""
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def cache_fits(factors: Mapping[Any, Any], device: jax.Device, *, shards: int = 1) -> bool:
  """The cost rule for cache_deltas: SVD leaves exist and their cache fits in CACHE_SHARE of the
  free memory of `device` (unknown free memory: no cache)."""
  needed = cache_bytes(factors, shards=shards)
  free = free_bytes(device)
  return needed > 0 and free is not None and needed <= CACHE_SHARE * free


def candidates(*, num_tasks: int, cache_deltas: bool, tower: bool) -> tuple[Layout, ...]:
  """The layouts `auto` times: TOWER_LAYOUTS whose call size divides `num_tasks` when the model's
  logits use the tower layouts (`tower`), else the one layout those logits run (one forward per task,
  nothing recomputed: `train.per_task`); all with the given cache choice."""
  if not tower:
    return (Layout(tasks_per_forward=1, remat=False, cache_deltas=cache_deltas),)
  return tuple(Layout(k, remat, cache_deltas) for k, remat in TOWER_LAYOUTS if k == 0 or num_tasks % k == 0)


def without_cache(options: Sequence[Layout]) -> tuple[Layout, ...]:
  """`options` with cache_deltas off, in their order, each once."""
  return tuple(dict.fromkeys(dataclasses.replace(c, cache_deltas=False) for c in options))


def fallback(options: Sequence[Layout], *, none_fit: bool) -> tuple[Layout, ...]:
  """The layouts to try after `options`: the same without the delta cache where they keep it and
  none of them fit (`none_fit`), else none."""
  return without_cache(options) if none_fit and options[0].cache_deltas else ()


def memory_limit(device: jax.Device) -> int | None:
  """The bytes a step may allocate on `device`: STEP_SHARE of its free memory (None: unknown)."""
  free = free_bytes(device)
  return None if free is None else int(STEP_SHARE * free)


def fits(needed: int | None, limit: int | None) -> bool:
  """Whether a step of `needed` bytes (`step_bytes`) fits in `limit`; an unknown side always fits."""
  return needed is None or limit is None or needed <= limit


def step_bytes(compiled: Any) -> int | None:
  """Bytes a compiled step allocates beyond its arguments, from XLA's memory analysis: outputs not
  aliased to a donated argument plus temporaries (None where the backend gives no analysis)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes


def time_step(
  step: Any, frozen: Any, state: Any, batches: Any, *, repeats: int = 2, memory_limit: int | None = None
) -> float | None:
  """Seconds of one step of `step` (jitted, state donated): compiled ahead of time, then the median
  of `repeats` steps after a first one. With `memory_limit`, a step whose `step_bytes` exceed it is
  not run and gives None. `state` is consumed; the caller passes a fresh one and discards it."""
  compiled = step.lower(frozen, state, batches).compile()
  if not fits(step_bytes(compiled), memory_limit):
    return None
  state, metrics = compiled(frozen, state, batches)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(frozen, state, batches)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def fastest(timings: Sequence[tuple[Layout, float | None]]) -> Layout:
  """The layout of the smallest time (the first listed on a tie); skipped layouts (None) never win
  unless every one was skipped, when the first listed (the leanest of TOWER_LAYOUTS) is kept."""
  timed = [pair for pair in timings if pair[1] is not None]
  return min(timed, key=lambda pair: pair[1])[0] if timed else timings[0][0]


ISA_PREFIXES = ("avx2", "avx512", "amx", "fma", "sve", "neon", "asimd")


def machine() -> dict[str, Any]:
  """What step timings are measured on: the JAX backend and device, and the host CPU's model and
  vector/matrix ISA flags (Linux /proc/cpuinfo; elsewhere `platform.processor()`, no flags)."""
  cpu, flags = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
          cpu = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = sorted({x for x in value.split() if x.startswith(ISA_PREFIXES)})
  except OSError:
    pass
  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "isa": flags,
    "jax": jax.__version__,
  }


def signature(trees: Any, **fields: Any) -> str:
  """What a step's timings depend on besides the machine: the structure, shapes and dtypes of
  `trees` and the plain values `fields`. Two steps of one signature run the same program on inputs
  of the same shapes, so one timing of the candidates serves both."""
  shapes = [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(trees)]
  text = repr((jax.tree.structure(trees), shapes, sorted(fields.items())))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_json(layout: Layout) -> dict[str, Any]:
  return dataclasses.asdict(layout)


def from_json(value: Mapping[str, Any], what: str) -> Layout:
  """The Layout written by `to_json`; ValueError naming `what` if it is not one."""
  fields = {f.name: f.type for f in dataclasses.fields(Layout)}
  if not isinstance(value, Mapping) or set(value) != set(fields):
    raise ValueError(f"{what}: expected a layout with the fields {sorted(fields)}; got {value!r}")
  k, remat, cache = value["tasks_per_forward"], value["remat"], value["cache_deltas"]
  if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0) or not all(
    isinstance(x, bool) for x in (remat, cache)
  ):
    raise ValueError(f"{what}: expected tasks_per_forward >= 0 and booleans; got {value!r}")
  return Layout(k, remat, cache)
