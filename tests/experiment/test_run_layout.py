"""How a run chooses its step layout among the timed candidates (`run._time_candidates`)."""

import numpy as np

from adarank_jax.core import layout, train
from adarank_jax.experiment import run


class _Stream:
  """A batch stream with a position, as pipeline.TaskBatches has."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return self.position

  def set_state(self, position):
    self.position = position

  def __next__(self):
    self.position += 1
    return (np.zeros((2, 3), np.float32),)


def _choose(options, seconds):
  """_time_candidates with a `timed` that gives seconds[layout] (None: would not fit)."""
  stream, asked = _Stream(), []

  def timed(candidate, _batches):
    asked.append(candidate)
    return seconds[candidate]

  chosen, timings = run._time_candidates(options, stream, train.make_mesh(), timed)
  assert stream.position == 0  # the timing's batch is given again
  return chosen, asked, timings


CACHED = layout.candidates(num_tasks=4, cache_deltas=True, tower=True)
PLAIN = layout.without_cache(CACHED)


def test_the_fastest_fitting_candidate_is_chosen():
  times = dict(zip(CACHED, (0.3, None, 0.2)))
  chosen, asked, timings = _choose(CACHED, times)
  assert chosen == CACHED[2] and asked == list(CACHED)
  assert [t["step_s"] for t in timings] == [0.3, None, 0.2]


def test_where_no_candidate_fits_with_the_cache_the_same_ones_without_it_are_timed():
  assert PLAIN == tuple(layout.Layout(c.tasks_per_forward, c.remat, False) for c in CACHED)
  times = {**dict.fromkeys(CACHED), **dict(zip(PLAIN, (0.5, 0.4, 0.6)))}
  chosen, asked, timings = _choose(CACHED, times)
  assert chosen == PLAIN[1] and asked == [*CACHED, *PLAIN]
  assert len(timings) == 6 and not any(t["cache_deltas"] for t in timings[3:])


def test_a_lone_candidate_is_timed_only_when_it_keeps_the_cache():
  lone = layout.Layout(cache_deltas=True)
  chosen, asked, _ = _choose((lone,), {lone: 1.0})
  assert chosen == lone and asked == [lone]
  # It would not fit: the run goes on without the cache, with nothing more to time.
  chosen, asked, _ = _choose((lone,), {lone: None})
  assert chosen == layout.Layout(cache_deltas=False) and asked == [lone]
  plain = layout.Layout(cache_deltas=False)
  chosen, asked, timings = _choose((plain,), {})
  assert chosen == plain and asked == [] and timings == []
