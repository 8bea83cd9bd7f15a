"""The checkpointed training loop (`experiment.loop`): fit, resume, and a non-finite loss."""

import jax
import numpy as np
import pytest
from tiny_encoder import TEMP, Batches, T, make_batches, problem

from adarank_jax.core import merging, train
from adarank_jax.experiment import loop
from adarank_jax.storage import checkpoint


def _fit(frozen, logits_fn, *, num_steps, directory=None, logged=None, cache_deltas=False):
  optimizer = train.make_optimizer(1e-2)
  state = train.init_state(
    frozen[1], optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5, prior=0.3, cache_deltas=cache_deltas
  )
  step = train.make_train_step(
    logits_fn=train.per_task(logits_fn), optimizer=optimizer, temperature=TEMP, num_tasks=T
  )
  manager = None if directory is None else checkpoint.Manager(directory)
  batches = Batches()
  if manager is not None:
    state = loop.resume(manager, state, frozen[1], batches)
  for point in loop.fit(
    frozen,
    state,
    train_step=step,
    batches=batches,
    num_steps=num_steps,
    log_every=2,
    checkpoint=manager,
    checkpoint_every=3,
    progress=False,
  ):
    if logged is not None:
      logged.append((point.step, point.metrics))
    state = point.state
  if manager is not None:
    manager.close()
  return jax.device_get(state)


def test_resume_reaches_the_same_state_as_an_uninterrupted_run(tmp_path):
  frozen, logits_fn = problem()
  logged = []
  straight = _fit(frozen, logits_fn, num_steps=6, logged=logged)
  assert [s for s, _ in logged] == [2, 4, 6]
  assert set(logged[0][1]) == {"loss", "entropy", "kept_fraction", "steps_per_s"}
  first = _fit(frozen, logits_fn, num_steps=3, directory=tmp_path / "ckpt")
  assert int(first.step) == 3
  # A fresh "process": new initial state, new jitted step; fit restores step 3 and continues.
  frozen, logits_fn = problem()
  resumed = _fit(frozen, logits_fn, num_steps=6, directory=tmp_path / "ckpt")
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert checkpoint.Manager(tmp_path / "ckpt").all_steps() == [3, 6]


def test_fit_lowers_the_entropy_of_a_fixed_batch():
  frozen, logits_fn = problem()
  batches = next(make_batches(0))
  optimizer = train.make_optimizer(1e-2)
  state = train.init_state(frozen[1], optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5, prior=0.3)
  loss_fn = train.make_loss_fn(
    logits_fn=train.per_task(logits_fn), temperature=TEMP, num_tasks=T, mask_mode="hard"
  )
  initial = float(loss_fn((state.mask_logits, state.coefficients), frozen, batches)[0])
  step = train.make_train_step(
    logits_fn=train.per_task(logits_fn), optimizer=optimizer, temperature=TEMP, num_tasks=T
  )
  *_, last = loop.fit(
    frozen, state, train_step=step, batches=Batches(fixed=batches), num_steps=30, log_every=10, progress=False
  )
  state = last.state
  final = float(loss_fn((state.mask_logits, state.coefficients), frozen, batches)[0])
  assert final < 0.8 * initial


def test_resume_with_cached_deltas(tmp_path):
  frozen, logits_fn = problem()
  straight = _fit(frozen, logits_fn, num_steps=6, cache_deltas=True)
  _fit(frozen, logits_fn, num_steps=3, directory=tmp_path / "ckpt", cache_deltas=True)
  resumed = _fit(frozen, logits_fn, num_steps=6, directory=tmp_path / "ckpt", cache_deltas=True)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  fresh = merging.init_deltas(frozen[1], resumed.mask_logits)
  for c, f in zip(jax.tree.leaves(resumed.deltas), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(c, f, rtol=0, atol=1e-6 * np.abs(f).max())


def test_a_non_finite_loss_stops_fit_before_it_is_checkpointed(tmp_path):
  frozen, logits_fn = problem()
  optimizer = train.make_optimizer(1e-2)
  state = train.init_state(
    frozen[1], optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5, prior=float("nan")
  )  # a NaN coefficient makes every loss NaN
  step = train.make_train_step(
    logits_fn=train.per_task(logits_fn), optimizer=optimizer, temperature=TEMP, num_tasks=T
  )
  manager = checkpoint.Manager(tmp_path / "ckpt")
  with pytest.raises(loop.NonFiniteLossError, match="step 1: the loss is nan"):
    list(
      loop.fit(
        frozen,
        state,
        train_step=step,
        batches=Batches(),
        num_steps=4,
        log_every=2,
        checkpoint=manager,
        checkpoint_every=1,
        progress=False,
      )
    )
  assert manager.all_steps() == []
  manager.close()
