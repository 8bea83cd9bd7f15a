"""Mask initialisation and the straight-through estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import masking
from adarank_jax.core.decomposition import SVD


def _factors(tasks, ranks):
  """A factor tree with one SVD leaf of each rank r (shapes (r+2, r)), and a dense leaf."""
  leaves = {
    f"w{r}": SVD(jnp.zeros((tasks, r + 2, r)), jnp.ones((tasks, r)), jnp.zeros((tasks, r, r))) for r in ranks
  }
  return {"block": leaves, "bias": jnp.zeros((tasks, 3))}


@pytest.mark.parametrize(
  "ratio, rank, tasks, kept",
  [
    (1.0, 6, 3, 6),
    (0.5, 6, 3, 3),
    (0.16, 50, 2, 8),
    (0.32, 768, 8, 245),
    (0.0, 768, 8, 96),
    (0.0, 7, 3, 2),
    (0.12, 4, 2, 0),
  ],
)
def test_init_keeps_floor_ratio_times_rank(ratio, rank, tasks, kept):
  logits = masking.init_logits(_factors(tasks, [rank]), initial_rank_ratio=ratio, num_tasks=tasks)
  assert set(logits) == {"block"} and set(logits["block"]) == {f"w{rank}"}  # no dense leaves
  leaf = np.asarray(logits["block"][f"w{rank}"])
  assert leaf.shape == (tasks, rank) and leaf.dtype == np.float32
  expected = np.where(np.arange(rank) < kept, 0.1, -0.1).astype(np.float32)
  np.testing.assert_array_equal(leaf, np.broadcast_to(expected, (tasks, rank)))
  assert int(masking.hard_mask(leaf).sum()) == tasks * kept


def test_init_counts_only_the_nonzero_singular_values_of_each_row():
  # Iso-CTS-like rows zero-padded to width 10: 2, 2 and 10 real components.
  s = jnp.asarray([[1.0] * 2 + [0.0] * 8, [1.0] * 2 + [0.0] * 8, [1.0] * 10])
  factors = {"w": SVD(jnp.ones((3, 12, 10)), s, jnp.ones((3, 10, 10)))}
  init = lambda f: masking.init_logits(f, initial_rank_ratio=0.5, num_tasks=3)
  on = np.asarray(init(factors)["w"]) > 0
  np.testing.assert_array_equal(on.sum(1), [1, 1, 5])  # int(0.5 * real count) of each row, not int(0.5 * 10)
  assert on[0, 0] and not on[0, 1:].any() and on[2, :5].all()
  traced = jax.eval_shape(init, factors)["w"]  # also runs traced (jax.eval_shape / jit)
  assert traced.shape == (3, 10) and traced.dtype == jnp.float32


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_init_rejects_ratios_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match="initial_rank_ratio"):
    masking.init_logits(_factors(2, [4]), initial_rank_ratio=ratio, num_tasks=2)


def test_init_checks_the_task_count():
  with pytest.raises(ValueError, match="'block/w4'.*num_tasks=3"):
    masking.init_logits(_factors(2, [4]), initial_rank_ratio=1.0, num_tasks=3)


def test_straight_through_forward_is_hard_and_gradient_is_sigmoids():
  logits = jnp.array([[-2.0, -0.1, 0.1, 3.0], [0.5, -0.5, 0.0, 1e-3]])
  temperature = 10.0
  np.testing.assert_array_equal(
    masking.straight_through(logits, temperature), (np.asarray(logits) > 0).astype(np.float32)
  )
  np.testing.assert_array_equal(masking.hard_mask(logits), masking.soft_mask(logits, temperature) > 0.5)
  weights = jnp.arange(1.0, 9.0).reshape(2, 4)
  ste_grad = jax.grad(lambda x: jnp.sum(weights * masking.straight_through(x, temperature)))(logits)
  sig = jax.nn.sigmoid(np.asarray(logits) / temperature)
  np.testing.assert_allclose(ste_grad, weights * sig * (1 - sig) / temperature, rtol=1e-6)
  soft_grad = jax.grad(lambda x: jnp.sum(weights * masking.soft_mask(x, temperature)))(logits)
  np.testing.assert_allclose(ste_grad, soft_grad, rtol=1e-6)


def test_mask_modes_and_kept_counts():
  logits = {"a": jnp.array([[0.1, -0.1, 0.2], [0.3, 0.4, -0.5]]), "b": {"c": jnp.array([[-1.0], [1.0]])}}
  svd = lambda s: SVD(jnp.ones((2, 4, len(s[0]))), jnp.array(s), jnp.ones((2, len(s[0]), 5)))
  # Row 1 of "a" has a zero singular value (padding): its kept logit there does not count.
  factors = {
    "a": svd([[3.0, 2.0, 1.0], [2.0, 0.0, 0.0]]),
    "b": {"c": svd([[1.0], [1.0]])},
    "d": jnp.ones((2, 3)),
  }
  counts = masking.kept_counts(logits, factors)
  np.testing.assert_array_equal(counts["a"], [2, 1])
  np.testing.assert_array_equal(counts["b"]["c"], [0, 1])
  np.testing.assert_allclose(masking.kept_fraction(logits, factors), 4 / 6)  # 6 components exist
  assert set(masking.MASK_FNS) == {"ste", "soft", "hard"}
  np.testing.assert_allclose(masking.MASK_FNS["soft"](logits["a"], 1.0), jax.nn.sigmoid(logits["a"]))
