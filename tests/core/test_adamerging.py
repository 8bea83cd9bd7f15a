"""AdaMerging (task-wise and layer-wise) and AdaRank's ablations on the shared training machinery.

The reference is AdaMerging's equation written out here with plain jnp (Yang et al., 2024, eq. 5-6):
  theta = theta_0 + sum_t clamp(lambda_t, 0, 1) tau_t          (task-wise: one lambda per task)
  theta_k = theta_0,k + sum_t clamp(lambda_t,k, 0, 1) tau_t,k    (layer-wise: one per task per tensor)
with torch.clamp's gradient (1 inside [0, 1], 0 outside).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import baselines, merging, train, tree_util
from adarank_jax.core.decomposition import decompose
from adarank_jax.core.task_vectors import task_vectors
from adarank_jax.data import pipeline
from adarank_jax.experiment import methods

T = 3
TEMP = 10.0
CLASSES = (3, 5, 2)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {"enc": {"a": {"kernel": f32(6, 4), "bias": f32(4)}, "b": {"kernel": f32(4, 6)}}}
  finetuned = [
    jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)
  ]
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  heads = [f32(6, c) for c in CLASSES]

  def logits(params, t, x):
    enc = params["enc"]
    return jnp.tanh(x @ enc["a"]["kernel"] + enc["a"]["bias"]) @ enc["b"]["kernel"] @ heads[t]

  batches = tuple(f32(4, 6) for _ in range(T))
  return origin, tau, logits, batches


def _reference_loss(origin, tau, lam, logits, batches, per):
  """AdaMerging's loss from its equations: lam is (T,) (task-wise) or {path: (T,)} (layer-wise)."""
  flat_o, flat_tau = tree_util.flatten(origin), tree_util.flatten(tau)
  params = {}
  for path, theta0 in flat_o.items():
    coef = lam if per == "task" else tree_util.flatten(lam)[path]
    coef = jnp.where(coef < 0, 0.0, jnp.where(coef > 1, 1.0, coef))
    params[path] = theta0 + sum(coef[t] * flat_tau[path][t] for t in range(T))
  params = tree_util.unflatten(params)
  total = 0.0
  for t, x in enumerate(batches):
    p = jax.nn.softmax(logits(params, t, x), axis=-1)
    total += -jnp.mean(jnp.sum(p * jnp.log(p), axis=-1))
  return total


@pytest.mark.parametrize("per", ["task", "tensor"])
def test_adamerging_loss_and_gradient_match_its_equations(per):
  origin, tau, logits, batches = _problem()
  rng = np.random.default_rng(1)
  state = train.init_state(
    tau,
    optimizer=train.make_optimizer(1e-3),
    num_tasks=T,
    initial_rank_ratio=1.0,
    prior=0.3,
    coefficients_per=per,
  )
  assert state.mask_logits == {}  # dense task vectors: no masks
  # Coefficients inside, below and above [0, 1]: the clamp's value and gradient both matter.
  draw = lambda: jnp.asarray(rng.permutation(np.array([-0.2, 0.45, 1.3], np.float32)))
  lam = draw() if per == "task" else jax.tree.map(lambda _: draw(), state.coefficients)
  loss_fn = train.make_loss_fn(
    logits_fn=train.per_task(logits), temperature=TEMP, num_tasks=T, coefficient_range=(0.0, 1.0)
  )
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(({}, lam), (origin, tau), batches)
  ref, ref_grad = jax.value_and_grad(_reference_loss, argnums=2)(origin, tau, lam, logits, batches, per)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  outside = np.concatenate([np.ravel((x < 0) | (x > 1)) for x in jax.tree.leaves(lam)])
  assert outside.any() and not np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads[1])])[outside].any()


def test_clamp_passes_the_gradient_on_the_closed_interval():
  x = jnp.array([-0.5, 0.0, 0.5, 1.0, 1.5])
  np.testing.assert_array_equal(merging.clamp(x, 0.0, 1.0), [0.0, 0.0, 0.5, 1.0, 1.0])
  np.testing.assert_array_equal(jax.grad(lambda v: merging.clamp(v, 0.0, 1.0).sum())(x), [0, 1, 1, 1, 0])


@pytest.mark.parametrize("name", ["adamerging_task", "adamerging_layer"])
def test_adamerging_with_frozen_coefficients_is_task_arithmetic(name):
  origin, tau, _, _ = _problem()
  training = methods.get(name).training
  state = train.init_state(
    tau,
    optimizer=train.make_optimizer(1e-3),
    num_tasks=T,
    initial_rank_ratio=1.0,
    prior=0.3,
    coefficients_per=training.coefficients,
  )
  merged = merging.merge(
    origin,
    tau,
    state.mask_logits,
    state.coefficients,
    temperature=TEMP,
    mask_mode="hard",
    coefficient_range=training.coefficient_range,
  )
  expected = baselines.task_arithmetic(origin, tau, scaling=0.3)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_task_wise_coefficients_are_shared_by_every_tensor():
  origin, tau, logits, batches = _problem()
  lam = jnp.array([0.2, 0.5, 0.9], jnp.float32)
  shared = merging.merge(origin, tau, {}, lam, temperature=TEMP)
  per_tensor = merging.merge(origin, tau, {}, jax.tree.map(lambda _: lam, tau), temperature=TEMP)
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(per_tensor)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("learn", ["masks", "coefficients"])
def test_ablations_leave_the_other_part_at_its_initial_value(learn):
  origin, tau, logits, batches = _problem()
  factors = decompose(tau, tree_util.select(tau, [r".*/kernel"]))
  optimizer = train.make_optimizer(0.05)  # large enough to flip masks within a few steps
  state = train.init_state(factors, optimizer=optimizer, num_tasks=T, initial_rank_ratio=1.0, prior=0.3)
  start = jax.device_get((state.mask_logits, state.coefficients))
  step = train.make_train_step(
    logits_fn=train.per_task(logits), optimizer=optimizer, temperature=TEMP, num_tasks=T, learn=learn
  )
  for _ in range(20):
    state, _ = step((origin, factors), state, batches)
  logits_now, coefficients_now = jax.device_get((state.mask_logits, state.coefficients))
  frozen, learned = (
    ((coefficients_now, start[1]), (logits_now, start[0]))
    if learn == "masks"
    else ((logits_now, start[0]), (coefficients_now, start[1]))
  )
  for a, b in zip(jax.tree.leaves(frozen[0]), jax.tree.leaves(frozen[1])):
    np.testing.assert_array_equal(a, b)
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(learned[0]), jax.tree.leaves(learned[1]))
  )
  if learn == "masks":  # all-on masks with the prior's coefficients: the static base (TA at 0.3)
    on = jax.tree.map(jnp.abs, state.mask_logits)
    merged = merging.merge(origin, factors, on, state.coefficients, temperature=TEMP, mask_mode="hard")
    for a, b in zip(
      jax.tree.leaves(merged), jax.tree.leaves(baselines.task_arithmetic(origin, tau, scaling=0.3))
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_data_fraction_subset_is_seeded_and_sized():
  source = [{"label": i} for i in range(200)]
  assert pipeline.subset(source, 1.0, seed=0) is source
  part = pipeline.subset(source, 0.05, seed=3)
  assert len(part) == 10
  labels = [part[i]["label"] for i in range(len(part))]
  assert labels == sorted(set(labels))
  assert labels == [pipeline.subset(source, 0.05, seed=3)[i]["label"] for i in range(10)]
  assert labels != [pipeline.subset(source, 0.05, seed=4)[i]["label"] for i in range(10)]
  assert len(pipeline.subset(source, 0.001, seed=0)) == 1
  with pytest.raises(ValueError, match="fraction"):
    pipeline.subset(source, 0.0, seed=0)
