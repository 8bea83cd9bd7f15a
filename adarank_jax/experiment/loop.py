"""The training loop of the experiment: `fit` runs a train step (`core.train.make_train_step`) from a
state to `num_steps`, yielding at logging points and checkpointing on the way; `resume` picks up the
latest verified checkpoint. The step and everything it computes are in `adarank_jax.core.train`.

  state = loop.resume(manager, state, factors, batches)
  for point in loop.fit(frozen, state, train_step=step, batches=batches, num_steps=N, checkpoint=manager):
    ...                                      # log, evaluate and select inline (loop.Logged)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from adarank_jax.core import merging
from adarank_jax.core.train import TrainState, place_batches
from adarank_jax.data import pipeline
from adarank_jax.storage import checkpoint as checkpoint_lib


def save_state(
  manager: checkpoint_lib.Manager, state: TrainState, *, data: Mapping[str, Any] | None = None
) -> None:
  """Checkpoints step, mask_logits, coefficients and opt_state at `state.step`, and `data` (the input
  pipeline's iterator state, `pipeline.TaskBatches.get_state()`) with them.

  Cached deltas are not saved: `restore_state` rebuilds them from the factors and the logits.
  """
  manager.save(int(jax.device_get(state.step)), state._replace(deltas=None)._asdict(), data=data)


def restore_state(
  manager: checkpoint_lib.Manager, step: int, target: TrainState, factors: Mapping[Any, Any]
) -> TrainState:
  """The state saved at `step`, with the structure, dtypes and shardings of `target`.

  If `target` caches deltas, its cache is made current for the restored mask logits (rebuilt from
  `factors` where a hard mask differs) in place: `target.deltas` is consumed.
  """
  saved = manager.restore(step, target._replace(deltas=None)._asdict())
  state = TrainState(**{**saved, "deltas": None})
  if target.deltas is None:
    return state
  return state._replace(deltas=_refresh_deltas(factors, target.deltas, target.mask_logits, state.mask_logits))


_refresh_deltas = jax.jit(merging.refresh_deltas, donate_argnums=1)


def resume(
  manager: checkpoint_lib.Manager,
  state: TrainState,
  factors: Mapping[Any, Any],
  batches: pipeline.TaskBatches | None = None,
) -> TrainState:
  """The latest checkpoint's state (see `restore_state`; a corrupt newest step falls back to the one
  before), or `state` itself when `manager` holds none. `batches` (when given) continue from the
  iterator state saved with the restored step."""
  latest = manager.latest_step()
  if latest is None:
    return state
  state = restore_state(manager, latest, state, factors)
  if batches is not None:
    batches.set_state(manager.data(int(jax.device_get(state.step))))
  return state


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


def _check_finite(step: int, loss: Any) -> None:
  if not np.isfinite(loss):
    raise NonFiniteLossError(
      f"step {step}: the loss is {float(loss)}; stopped before logging or "
      "checkpointing this state (check the prior, the learning rate and "
      "the inputs)"
    )


class Logged(NamedTuple):
  """What `fit` yields at a logging point: the step, its numpy metrics (loss, entropy (T,),
  kept_fraction, steps_per_s) and the state after it. The state's buffers are donated to the next
  step: copy (jax.device_get) whatever must outlive the loop body."""

  step: int
  metrics: dict[str, np.ndarray]
  state: TrainState


def fit(
  frozen: tuple[Any, Any],
  state: TrainState,
  *,
  train_step: Callable[..., Any],
  batches: pipeline.TaskBatches,
  num_steps: int,
  log_every: int = 50,
  checkpoint: checkpoint_lib.Manager | None = None,
  checkpoint_every: int | None = None,
  mesh: Mesh | None = None,
  progress: bool = True,
) -> Iterator[Logged]:
  """Runs `train_step` from `state.step` to `num_steps` and yields a `Logged` every `log_every` steps
  and at the last step. The caller resumes first, then logs, evaluates and selects inline:

    state = resume(manager, state, factors)     # the latest checkpoint's state, if any
    for point in fit(frozen, state, checkpoint=manager, ...):
      writer.scalars(point.step, point.metrics)
      if point.step % eval_every == 0:
        evaluate(point.state)
      state = point.state                              # the final state after the loop

  A checkpoint due at a logging point is written after the loop body has run, so what the body
  records for that step (an evaluation, a selected model) is never behind the checkpoint. The host
  waits on the device only at logging points and when checkpointing; in between, steps are
  dispatched asynchronously.

  Args:
    frozen: (origin, factors), already placed (see `place_frozen`) when a mesh is used.
    state: the state to continue from (`init_state`, or `resume`'s); nothing runs (and nothing is
      yielded) if it is already at `num_steps`.
    train_step: from `make_train_step`.
    batches: every step's batches (a length-T tuple), positioned where `state` was saved (`resume`);
      their iterator state is saved with every checkpoint.
    num_steps: total number of steps (not steps still to go).
    log_every: logging interval in steps.
    checkpoint: optional `checkpoint.Manager`; the state is saved every `checkpoint_every` steps
      and at the last step (after that point's loop body).
    checkpoint_every: save interval in steps (None: only at the end).
    mesh: when given, every batch is placed with `place_batches` before the step.
    progress: show a tqdm bar with the loss and steps/s.

  Raises:
    NonFiniteLossError: at the first logging or checkpointing point whose loss is NaN or Inf.
  """
  start = int(jax.device_get(state.step))
  last_time, last_step = time.perf_counter(), start
  with tqdm.tqdm(total=num_steps, initial=start, disable=not progress, desc="train") as bar:
    for step in range(start + 1, num_steps + 1):
      step_batches = next(batches)  # one batch of every task
      if mesh is not None:
        step_batches = place_batches(step_batches, mesh)
      state, metrics = train_step(frozen, state, step_batches)
      bar.update(1)
      saving = checkpoint is not None and (
        step == num_steps or (checkpoint_every and step % checkpoint_every == 0)
      )
      log_point = step % log_every == 0 or step == num_steps
      if log_point:  # one fetch of every metric
        metrics = jax.device_get(metrics)
      if saving or log_point:  # never log or keep a non-finite state
        _check_finite(step, metrics["loss"] if log_point else jax.device_get(metrics["loss"]))
      if log_point:
        now = time.perf_counter()
        metrics["steps_per_s"] = np.asarray((step - last_step) / max(now - last_time, 1e-9))
        bar.set_postfix(
          loss=f"{float(metrics['loss']):.4f}", steps_per_s=f"{float(metrics['steps_per_s']):.2f}"
        )
        yield Logged(step, metrics, state)
        last_time, last_step = time.perf_counter(), step  # the loop body's time is not training's
      if saving:
        save_state(checkpoint, state, data=batches.get_state())
