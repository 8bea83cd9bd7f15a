"""AdaRank on its bases: with the base's own masks on and coefficients at its lambda it is the static base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import baselines, masking, merging, train, tree_util
from adarank_jax.core.decomposition import decompose, is_svd
from adarank_jax.core.task_vectors import task_vectors
from adarank_jax.experiment import methods

T = 3


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {
    "enc": {
      "a": {"kernel": f32(12, 8), "bias": f32(8)},
      "b": {"kernel": f32(8, 12)},
      "norm": {"scale": f32(12)},
    }
  }
  finetuned = [
    jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)
  ]
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  return origin, tau, decompose(tau, tree_util.select(tau, [r".*/kernel"]))


@pytest.mark.parametrize("matrices", ["decomposed", "all_2d"])
def test_tsv_m_components_are_each_tasks_whitened_columns(matrices):
  origin, tau, factors = _problem()
  components = tree_util.flatten(baselines.tsv_m_components(factors, matrices=matrices))
  for path, leaf in components.items():
    if not is_svd(leaf):
      np.testing.assert_allclose(leaf, tree_util.flatten(tau)[path] / T, rtol=1e-6)
      continue
    k = baselines.tsv_rank(8, T)  # r = min(12, 8) = 8 -> 2 components per task
    assert leaf.u.shape == (T, leaf.u.shape[1], k) and leaf.s.shape == (T, k)
    u_cat = np.concatenate(list(leaf.u), axis=1)  # (m, T*k): orthonormal columns
    vt_cat = np.concatenate(list(leaf.vt), axis=0)  # (T*k, n): orthonormal rows
    np.testing.assert_allclose(u_cat.T @ u_cat, np.eye(T * k), atol=1e-5)
    np.testing.assert_allclose(vt_cat @ vt_cat.T, np.eye(T * k), atol=1e-5)
    # Task t keeps its own top-k singular values.
    np.testing.assert_allclose(leaf.s, tree_util.flatten(factors)[path].s[:, :k], rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_adarank_on_tsv_m_with_all_on_masks_is_static_tsv_m(alpha):
  origin, tau, factors = _problem()
  components = baselines.tsv_m_components(factors)
  training = methods.get("adarank_tsv_m").training
  state = train.init_state(
    components,
    optimizer=train.make_optimizer(1e-3),
    num_tasks=T,
    initial_rank_ratio=1.0,
    prior=alpha,
    coefficients_per=training.coefficients,
  )
  assert all(np.all(np.asarray(x) > 0) for x in jax.tree.leaves(state.mask_logits))  # all on
  merged = merging.merge(
    origin,
    components,
    state.mask_logits,
    state.coefficients,
    temperature=10.0,
    mask_mode="hard",
    precision=jax.lax.Precision.HIGHEST,
  )
  expected = baselines.tsv_m(origin, factors, scaling=alpha)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # A mask turned off removes exactly that component: the merge moves by alpha * u s v^T.
  path = "enc/a/kernel"
  logits = tree_util.flatten(state.mask_logits)
  logits[path] = logits[path].at[1, 0].set(-0.1)
  off = merging.merge(
    origin,
    components,
    tree_util.unflatten(logits),
    state.coefficients,
    temperature=10.0,
    mask_mode="hard",
    precision=jax.lax.Precision.HIGHEST,
  )
  leaf = tree_util.flatten(components)[path]
  dropped = alpha * leaf.s[1, 0] * jnp.outer(leaf.u[1, :, 0], leaf.vt[1, 0])
  np.testing.assert_allclose(
    tree_util.flatten(expected)[path] - tree_util.flatten(off)[path], dropped, atol=1e-5
  )


@pytest.mark.parametrize("side,common_fraction", [("out", 0.5), ("in", 0.5), ("out", 1.0)])
def test_adarank_on_iso_cts_with_all_on_masks_is_static_iso_cts(side, common_fraction):
  origin, tau, factors = _problem(1)
  components = baselines.iso_cts_components(factors, common_fraction=common_fraction, side=side)
  rows = T + 1  # one row per task and one for the common subspace
  common, per_task = baselines.iso_cts_split(8, T, common_fraction)
  for leaf in tree_util.flatten(components).values():
    if is_svd(leaf):
      width = max(common, per_task)
      assert leaf.s.shape == (rows, width)
      kept = np.asarray(leaf.s) != 0  # the isotropic value on the real components, 0 on padding
      assert kept.sum() == 8 and np.ptp(np.asarray(leaf.s)[kept]) < 1e-5
      assert kept[:T].sum(1).tolist() == [per_task] * T and kept[T].sum() == common
    else:  # the mean of the task vectors, as T rows of tau_t / T and a zero common row
      assert leaf.shape[0] == rows and not np.any(leaf[T])
  training = methods.get("adarank_iso_cts").training
  state = train.init_state(
    components,
    optimizer=train.make_optimizer(1e-3),
    num_tasks=rows,
    initial_rank_ratio=1.0,
    prior=1.5,
    coefficients_per=training.coefficients,
  )
  # The zero padding is neither kept nor counted: each row keeps its real components, all on here.
  for counts in tree_util.flatten(masking.kept_counts(state.mask_logits, components)).values():
    assert np.asarray(counts).tolist() == [per_task] * T + [common]
  assert float(masking.kept_fraction(state.mask_logits, components)) == 1.0
  merged = merging.merge(
    origin,
    components,
    state.mask_logits,
    state.coefficients,
    temperature=10.0,
    mask_mode="hard",
    precision=jax.lax.Precision.HIGHEST,
  )
  expected = baselines.iso_cts(origin, factors, scaling=1.5, common_fraction=common_fraction, side=side)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if common_fraction == 1.0:  # no task-specific directions: Iso-CTS is Iso-C
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(baselines.iso_c(origin, factors, scaling=1.5))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank_ratio", [0.25, 0.5])
def test_adarank_on_cart_with_its_top_k_masks_on_is_static_cart(rank_ratio):
  rng = np.random.default_rng(2)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {"enc": {"a": {"kernel": f32(12, 8), "bias": f32(8)}, "b": {"kernel": f32(8, 12)}}}
  finetuned = [jax.tree.map(lambda x: x + 0.3 * f32(*x.shape), base) for _ in range(T)]
  origin, tau = task_vectors(base, finetuned, origin="average")
  factors = decompose(tau, tree_util.select(tau, [r".*/kernel"]))
  # CART's top-k components on (logit +0.1), the rest off (-0.1); every coefficient at CART's lambda.
  logits = {}
  for path, leaf in tree_util.flatten(factors).items():
    if is_svd(leaf):
      k = baselines.cart_rank(leaf, rank_ratio)
      row = jnp.where(jnp.arange(leaf.s.shape[-1]) < k, 0.1, -0.1).astype(jnp.float32)
      logits[path] = jnp.broadcast_to(row, leaf.s.shape)
  coefficients = merging.init_coefficients(factors, num_tasks=T, prior=2.0)
  merged = merging.merge(
    origin,
    factors,
    tree_util.unflatten(logits),
    coefficients,
    temperature=10.0,
    mask_mode="hard",
    precision=jax.lax.Precision.HIGHEST,
  )
  expected = baselines.cart(origin, factors, scaling=2.0, rank_ratio=rank_ratio)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
