"""The step's layouts: the cost rule of the delta cache, the candidates, timing and the stored form.

That every layout gives the same step is tested in test_train.py (each candidate against the plain
step through a 50-step Adam trajectory with mask flips)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import layout, merging, train
from adarank_jax.core.decomposition import SVD


def _factors(tasks=3):
  svd = SVD(jnp.zeros((tasks, 6, 4)), jnp.zeros((tasks, 4)), jnp.zeros((tasks, 4, 5)))
  return {"enc": {"a": {"kernel": svd, "bias": jnp.zeros((tasks, 5))}}}


class _Device:
  """A device whose allocator reports `limit` bytes with `used` in use."""

  def __init__(self, limit, used):
    self.stats = {"bytes_limit": limit, "bytes_in_use": used}

  def memory_stats(self):
    return self.stats


def test_cache_bytes_count_one_float32_matrix_and_u_transposed_per_task_and_svd_leaf():
  expected = 4 * 3 * 6 * 5 + 4 * 3 * 4 * 6
  assert layout.cache_bytes(_factors()) == expected
  assert layout.cache_bytes(_factors(), shards=2) == expected // 2
  logits = {"enc": {"a": {"kernel": jnp.zeros((3, 4))}}}
  cache = merging.init_deltas(_factors(), logits)
  assert sum(x.nbytes for x in jax.tree.leaves(cache)) == expected  # what init_deltas allocates
  assert layout.cache_bytes({"dense": jnp.zeros((3, 6, 5))}) == 0  # AdaMerging: nothing to cache


def test_the_cache_is_kept_only_where_it_fits_in_the_share_of_free_memory():
  needed = layout.cache_bytes(_factors())
  free = int(needed / layout.CACHE_SHARE)
  assert layout.cache_fits(_factors(), _Device(free + 100, 100))
  assert not layout.cache_fits(_factors(), _Device(free + 99, 100))
  assert not layout.cache_fits({"dense": jnp.zeros((3, 6, 5))}, _Device(10**12, 0))
  host = layout.free_bytes(jax.devices()[0])  # the CPU reports no limit: the host's free memory
  assert host is not None and host > 0


def test_candidates_are_the_tower_layouts_whose_call_size_divides_the_tasks():
  four = layout.candidates(num_tasks=4, cache_deltas=True, tower=True)
  assert [(c.tasks_per_forward, c.remat) for c in four] == list(layout.TOWER_LAYOUTS)
  assert all(c.cache_deltas for c in four)
  # Without the tower layouts the one candidate is what per_task logits run, and says so.
  (plain,) = layout.candidates(num_tasks=3, cache_deltas=False, tower=False)
  assert plain == layout.Layout(tasks_per_forward=1, remat=False, cache_deltas=False)
  assert str(plain) == "1 task(s) per forward call, remat off, cached deltas off"
  # A call size that does not divide the tasks is not a candidate (one_forward would refuse it).
  assert all(
    c.tasks_per_forward in (0, 1) for c in layout.candidates(num_tasks=3, cache_deltas=False, tower=True)
  )


def test_time_step_runs_a_compiling_step_then_the_timed_ones_and_fastest_picks_the_minimum():
  calls = []

  @functools.partial(jax.jit, donate_argnums=1)
  def step(frozen, state, batches):
    jax.debug.callback(lambda: calls.append(1))
    return state + frozen, {"loss": jnp.sum(state)}

  state = jnp.zeros((64, 64))
  seconds = layout.time_step(step, jnp.ones((64, 64)), state, None, repeats=3)
  jax.effects_barrier()
  assert len(calls) == 4 and 0 <= seconds < 1
  a, b = layout.Layout(1, True, False), layout.Layout(0, False, False)
  assert layout.fastest([(a, 0.2), (b, 0.1)]) == b
  assert layout.fastest([(a, 0.1), (b, 0.1)]) == a  # a tie keeps the first listed
  assert layout.fastest([(a, None), (b, 0.3)]) == b  # a skipped layout never wins
  assert layout.fastest([(a, None), (b, None)]) == a  # unless all were: the first (leanest) is kept


def test_time_step_skips_a_step_whose_memory_analysis_exceeds_the_limit_without_running_it():
  calls = []

  @jax.jit
  def step(frozen, state, batches):
    jax.debug.callback(lambda: calls.append(1))
    big = jnp.sin(jnp.outer(state, state))  # a (1024, 1024) float32 temporary: 4 MiB
    return state + 1, {"loss": jnp.sum(big @ big.T)}

  state = jnp.zeros(1024)
  needed = layout.step_bytes(step.lower(None, state, None).compile())
  assert needed >= 4 * 1024 * 1024
  assert layout.time_step(step, None, state, None, memory_limit=needed - 1) is None
  jax.effects_barrier()
  assert not calls
  assert layout.time_step(step, None, state, None, memory_limit=needed) is not None


def test_signature_tells_steps_of_other_shapes_or_fields_apart():
  tree = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4, jnp.int32)]}
  same = {"a": jnp.ones((2, 3)), "b": [jnp.ones(4, jnp.int32)]}
  assert layout.signature(tree, masks=True) == layout.signature(same, masks=True)
  assert layout.signature(tree, masks=True) != layout.signature(tree, masks=False)
  assert layout.signature(tree) != layout.signature({"a": jnp.zeros((3, 2)), "b": [jnp.zeros(4, jnp.int32)]})
  assert layout.signature(tree) != layout.signature({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4)]})
  assert layout.signature(tree) != layout.signature({"c": jnp.zeros((2, 3)), "b": [jnp.zeros(4, jnp.int32)]})


def test_a_layout_round_trips_and_a_bad_one_names_its_source():
  chosen = layout.Layout(0, False, True)
  assert layout.from_json(layout.to_json(chosen), "x") == chosen
  for bad in (
    {"tasks_per_forward": 1, "remat": True},
    {"tasks_per_forward": -1, "remat": True, "cache_deltas": 0},
    None,
  ):
    with pytest.raises(ValueError, match="runs/a/layout.json"):
      layout.from_json(bad, "runs/a/layout.json")
  assert "cached deltas on" in str(chosen) and "all tasks" in str(chosen)


def test_machine_names_the_cpu_and_its_vector_isa():
  described = layout.machine()
  assert described["backend"] == jax.default_backend() and described["cpu"]
  assert all(flag.startswith(layout.ISA_PREFIXES) for flag in described["isa"])
  with open("/proc/cpuinfo") as f:
    if " avx2" in f.read():  # an x86 host with AVX2 lists it
      assert "avx2" in described["isa"]


def test_the_step_takes_the_layouts_of_a_run_unchanged_in_math():
  # One jitted step per layout over the same frozen inputs: same loss at step 1 (the full
  # trajectory, with mask flips, is in test_train.py).
  rng = np.random.default_rng(0)
  base = {"enc": {"kernel": rng.normal(size=(6, 4)).astype(np.float32)}}
  tau = rng.normal(size=(3, 6, 4)).astype(np.float32)
  u, s, vt = np.linalg.svd(tau, full_matrices=False)
  frozen = (base, {"enc": {"kernel": SVD(jnp.asarray(u), jnp.asarray(s), jnp.asarray(vt))}})
  heads = rng.normal(size=(3, 4, 2)).astype(np.float32)
  batches = tuple(rng.normal(size=(2, 6)).astype(np.float32) for _ in range(3))
  losses = []
  for candidate in layout.candidates(num_tasks=3, cache_deltas=True, tower=True) + layout.candidates(
    num_tasks=3, cache_deltas=False, tower=True
  ):
    logits_fn = train.one_forward(
      lambda p, x: x @ p["enc"]["kernel"],
      lambda t, f: f @ heads[t],
      tasks_per_call=candidate.tasks_per_forward or None,
      remat=candidate.remat,
    )
    optimizer = train.make_optimizer(1e-2)
    step = train.make_train_step(logits_fn=logits_fn, optimizer=optimizer, temperature=10.0, num_tasks=3)
    state = train.init_state(
      frozen[1],
      optimizer=optimizer,
      num_tasks=3,
      initial_rank_ratio=0.5,
      prior=0.3,
      cache_deltas=candidate.cache_deltas,
    )
    losses.append(float(step(frozen, state, batches)[1]["loss"]))
  np.testing.assert_allclose(losses, losses[0], rtol=1e-6)
