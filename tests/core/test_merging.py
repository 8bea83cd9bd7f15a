"""Merged-weight rebuild against naive numpy loops; subtree merging; dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import masking, tree_util
from adarank_jax.core.decomposition import decompose
from adarank_jax.core.merging import init_coefficients, merge
from adarank_jax.core.task_vectors import task_vectors

T = 3
TEMP = 10.0


@pytest.fixture(name="setup")
def _setup():
  rng = np.random.default_rng(2)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {
    "enc": {"a": {"kernel": f32(6, 4), "bias": f32(4)}, "b": {"kernel": f32(4, 6)}},
    "head": f32(6, 2),
    "ids": np.arange(3, dtype=np.int32),
  }
  finetuned = [
    jax.tree.map(
      lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32) if x.dtype.kind == "f" else x, base
    )
    for _ in range(T)
  ]
  # Merge the encoder only: the head is left out of the task vectors.
  origin, tau = task_vectors(
    base, finetuned, origin="pretrained", include=tree_util.select(base, [r"enc/.*"])
  )
  factors = decompose(tau, tree_util.select(tau, [r".*/kernel"]))
  return base, origin, tau, factors, rng


def _naive(origin, factors, logits, coefficients):
  """W = origin + sum_t lam_t U_t diag(b_t s_t) V_t^T (SVD) / + sum_t lam_t tau_t (dense), loops."""
  out = {}
  factor_flat, logit_flat, coef_flat = map(tree_util.flatten, (factors, logits, coefficients))
  for path, base in tree_util.flatten(origin).items():
    if path not in factor_flat:
      out[path] = np.asarray(base)
      continue
    w = np.asarray(base, np.float64).copy()
    f = factor_flat[path]
    for t in range(T):
      lam = float(coef_flat[path][t])
      if isinstance(f, tuple):
        u, s, vt = (np.asarray(x, np.float64)[t] for x in f)
        b = (np.asarray(logit_flat[path][t]) > 0).astype(np.float64)
        for i in range(s.shape[0]):
          w += lam * b[i] * s[i] * np.outer(u[:, i], vt[i])
      else:
        w += lam * np.asarray(f[t], np.float64)
    out[path] = w
  return out


def test_all_ones_masks_and_one_lambda_is_task_arithmetic(setup):
  base, origin, tau, factors, _ = setup
  logits = masking.init_logits(factors, initial_rank_ratio=1.0, num_tasks=T)
  coefficients = init_coefficients(factors, num_tasks=T, prior=0.3)
  merged = tree_util.flatten(merge(origin, factors, logits, coefficients, temperature=TEMP, mask_mode="hard"))
  tau_flat = tree_util.flatten(tau)
  for path, leaf in tree_util.flatten(base).items():
    expected = leaf + 0.3 * tau_flat[path].sum(0) if path in tau_flat else leaf
    np.testing.assert_allclose(merged[path], expected, atol=1e-5)
    assert merged[path].dtype == leaf.dtype
  assert merged["head"] is base["head"] and merged["ids"] is base["ids"]


@pytest.mark.parametrize("mask_mode", ["hard", "ste"])
def test_random_masks_and_coefficients_match_naive_loops(setup, mask_mode):
  _, origin, _, factors, rng = setup
  logits = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
    masking.init_logits(factors, initial_rank_ratio=1.0, num_tasks=T),
  )
  coefficients = jax.tree.map(
    lambda x: jnp.asarray(rng.uniform(-1, 2, size=x.shape), jnp.float32),
    init_coefficients(factors, num_tasks=T, prior=0.0),
  )
  merged = jax.jit(lambda o, f, l, c: merge(o, f, l, c, temperature=TEMP, mask_mode=mask_mode))(
    origin, factors, logits, coefficients
  )
  expected = _naive(origin, factors, logits, coefficients)
  for path, leaf in tree_util.flatten(merged).items():
    np.testing.assert_allclose(leaf, expected[path], atol=1e-5)


def test_soft_mode_uses_the_sigmoid(setup):
  _, origin, _, factors, _ = setup
  logits = masking.init_logits(factors, initial_rank_ratio=0.5, num_tasks=T)
  coefficients = init_coefficients(factors, num_tasks=T, prior=1.0)
  soft = merge(origin, factors, logits, coefficients, temperature=TEMP, mask_mode="soft")
  svd = factors["enc"]["a"]["kernel"]
  p = jax.nn.sigmoid(logits["enc"]["a"]["kernel"] / TEMP)
  expected = origin["enc"]["a"]["kernel"] + np.einsum("tmr,tr,trn->mn", svd.u, p * svd.s, svd.vt)
  np.testing.assert_allclose(soft["enc"]["a"]["kernel"], expected, atol=1e-5)


def test_bfloat16_factors_compute_in_float32(setup):
  _, origin, tau, _, _ = setup
  select = tree_util.select(tau, [r".*/kernel"])
  f32_factors = decompose(tau, select)
  bf16_factors = decompose(tau, select, dtype=jnp.bfloat16)
  logits = masking.init_logits(f32_factors, initial_rank_ratio=1.0, num_tasks=T)
  coefficients = init_coefficients(f32_factors, num_tasks=T, prior=0.3)
  ref = merge(origin, f32_factors, logits, coefficients, temperature=TEMP)
  out = merge(origin, bf16_factors, logits, coefficients, temperature=TEMP)
  for path, leaf in tree_util.flatten(out).items():
    assert leaf.dtype == tree_util.flatten(origin)[path].dtype
    np.testing.assert_allclose(leaf, tree_util.flatten(ref)[path], atol=2e-2)
  bf16_origin = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16) if x.dtype.kind == "f" else x, origin)
  out = merge(bf16_origin, f32_factors, logits, coefficients, temperature=TEMP)
  assert out["enc"]["a"]["kernel"].dtype == jnp.bfloat16


def test_errors_name_the_key(setup):
  _, origin, _, factors, _ = setup
  logits = masking.init_logits(factors, initial_rank_ratio=1.0, num_tasks=T)
  coefficients = init_coefficients(factors, num_tasks=T, prior=0.3)
  with pytest.raises(ValueError, match="mask_mode"):
    merge(origin, factors, logits, coefficients, temperature=TEMP, mask_mode="binary")
  missing = {"enc": {"a": coefficients["enc"]["a"]}}
  with pytest.raises(ValueError, match="coefficients.*'enc/b/kernel'"):
    merge(origin, factors, logits, missing, temperature=TEMP)
  with pytest.raises(ValueError, match="mask_logits.*'enc/a/kernel'.*shape"):
    merge(
      origin,
      factors,
      {"enc": {"a": {"kernel": jnp.zeros((T, 2))}, "b": logits["enc"]["b"]}},
      coefficients,
      temperature=TEMP,
    )
  with pytest.raises(ValueError, match="origin lacks.*extra"):
    merge(origin, dict(factors, extra=jnp.zeros((T, 2))), logits, coefficients, temperature=TEMP)
