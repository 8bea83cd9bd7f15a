"""The generative objective and its evaluation sums against numpy formulas written out loop by loop."""

import jax.numpy as jnp
import numpy as np

from adarank_jax.core import objectives


def _softmax_entropy(z):
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  return float(-(p * np.log(p)).sum())


def _batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
  lengths = [5, 2, 0]  # right padding; the last sequence is all padding
  weights = np.array([[1.0] * n + [0.0] * (5 - n) for n in lengths], np.float32)
  ids = rng.integers(0, 7, size=(3, 5)).astype(np.int32)
  return logits, weights, ids, lengths


def test_next_token_entropy_is_the_mean_over_every_non_pad_position():
  logits, weights, _, lengths = _batch()
  values = [
    _softmax_entropy(logits[b, i].astype(np.float64)) for b, n in enumerate(lengths) for i in range(n)
  ]
  got = objectives.next_token_entropy(jnp.asarray(logits), jnp.asarray(weights))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.mean(values), rtol=1e-6)  # 7 positions, the last ones included
  assert len(values) == 7
  in_bf16 = objectives.next_token_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(weights))
  assert in_bf16.dtype == jnp.float32
  np.testing.assert_allclose(objectives.next_token_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2))), 0.0)


def test_next_token_sums_give_the_entropy_and_the_perplexity():
  logits, weights, ids, lengths = _batch()
  sums = objectives.next_token_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(weights))
  nll = []
  for b, n in enumerate(lengths):
    for i in range(n - 1):  # position i predicts token i + 1, both real
      z = logits[b, i].astype(np.float64)
      log_p = z - z.max() - np.log(np.exp(z - z.max()).sum())
      nll.append(-log_p[ids[b, i + 1]])
  assert float(sums["targets"]) == len(nll) == 5 and float(sums["positions"]) == 7
  np.testing.assert_allclose(sums["nll_sum"], np.sum(nll), rtol=1e-6)
  np.testing.assert_allclose(
    sums["entropy_sum"] / sums["positions"],
    objectives.next_token_entropy(jnp.asarray(logits), jnp.asarray(weights)),
    rtol=1e-6,
  )
