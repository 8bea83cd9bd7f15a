"""The tiny problem of the step and loop tests: a 2-layer encoder merged from T fine-tuned copies, with
one fixed linear head per task, and a deterministic stream of unlabeled batches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from adarank_jax.core import tree_util
from adarank_jax.core.decomposition import decompose
from adarank_jax.core.task_vectors import task_vectors

T = 3
TEMP = 10.0
BATCH = 4
CLASSES = (3, 5, 2)


def problem(seed=0):
  """Tiny 2-layer encoder merged from T fine-tuned copies, with one fixed linear head per task."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {"enc": {"a": {"kernel": f32(6, 4), "bias": f32(4)}, "b": {"kernel": f32(4, 6)}}}
  finetuned = [
    jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)
  ]
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, [r".*/kernel"]))
  heads = [f32(6, c) for c in CLASSES]

  def task_logits_fn(params, t, x):
    enc = params["enc"]
    h = jnp.tanh(x @ enc["a"]["kernel"] + enc["a"]["bias"])
    return (h @ enc["b"]["kernel"]) @ heads[t]

  return (origin, factors), task_logits_fn


def make_batches(start, seed=7):
  """Deterministic stream: batch p of task t is a function of (seed, t, p) only."""
  for p in itertools.count(start):
    yield tuple(
      np.random.default_rng([seed, t, p]).normal(size=(BATCH, 6)).astype(np.float32) for t in range(T)
    )


class Batches:
  """What `fit` takes (pipeline.TaskBatches' interface) over `_make_batches`, or one fixed batch."""

  def __init__(self, fixed=None):
    self.position, self.fixed = 0, fixed

  def __iter__(self):
    return self

  def __next__(self):
    self.position += 1
    return self.fixed if self.fixed is not None else next(make_batches(self.position - 1))

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]
