"""Entropy objective, the jitted train step (no retrace, Adam wiring, gradients) and its layouts; the
checkpointed loop over it is tested in tests/experiment/test_loop.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_encoder import CLASSES, TEMP, T, make_batches, problem

from adarank_jax.core import layout, merging, objectives, train


def test_entropy_against_numpy():
  logits = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  rows = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(objectives.entropy(jnp.asarray(logits)), rows.mean(), rtol=1e-6)
  weights = np.array([1, 1, 0, 1, 0], np.float32)
  np.testing.assert_allclose(
    objectives.entropy(jnp.asarray(logits), jnp.asarray(weights)), rows[[0, 1, 3]].mean(), rtol=1e-6
  )
  np.testing.assert_allclose(objectives.entropy(jnp.zeros((2, 4))), np.log(4), rtol=1e-6)


def test_step_compiles_once_and_applies_adam():
  frozen, logits_fn = problem()
  traces = []

  def counting_logits_fn(params, t, x):
    traces.append(t)
    return logits_fn(params, t, x)

  lr = 1e-3
  optimizer = train.make_optimizer(lr)
  state = train.init_state(frozen[1], optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5, prior=0.3)
  loss_fn = train.make_loss_fn(logits_fn=train.per_task(logits_fn), temperature=TEMP, num_tasks=T)
  batches = next(make_batches(0))
  grads = jax.grad(lambda tr: loss_fn(tr, frozen, batches)[0])((state.mask_logits, state.coefficients))
  before = jax.device_get((state.mask_logits, state.coefficients))
  step = train.make_train_step(
    logits_fn=train.per_task(counting_logits_fn), optimizer=optimizer, temperature=TEMP, num_tasks=T
  )
  state, metrics = step(frozen, state, batches)
  # First Adam step (bias-corrected m = g, v = g^2): update = -lr * g / (|g| + 1e-8).
  after = jax.device_get((state.mask_logits, state.coefficients))
  for b, a, g in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(grads)):
    g = np.asarray(g, np.float64)
    np.testing.assert_allclose(a, b - lr * g / (np.abs(g) + 1e-8), atol=1e-7)
    assert np.any(np.abs(g) > 1e-6)
  batch_iter = make_batches(1)
  for _ in range(3):
    state, metrics = step(frozen, state, next(batch_iter))
  assert traces == list(range(T))  # traced once, for every task, and never again
  assert int(state.step) == 4
  assert metrics["entropy"].shape == (T,)
  np.testing.assert_allclose(metrics["loss"], metrics["entropy"].sum(), rtol=1e-6)


def test_ste_loss_is_the_hard_mask_loss():
  frozen, logits_fn = problem()
  state = train.init_state(
    frozen[1], optimizer=train.make_optimizer(1e-3), num_tasks=T, initial_rank_ratio=0.5, prior=0.3
  )
  batches = next(make_batches(0))
  trainable = (state.mask_logits, state.coefficients)
  losses = {
    mode: train.make_loss_fn(
      logits_fn=train.per_task(logits_fn), temperature=TEMP, num_tasks=T, mask_mode=mode
    )(trainable, frozen, batches)[0]
    for mode in ("ste", "hard", "soft")
  }
  np.testing.assert_allclose(losses["ste"], losses["hard"], rtol=1e-6)
  assert abs(float(losses["soft"]) - float(losses["hard"])) > 1e-4


def test_gradients_match_finite_differences_of_the_soft_surrogate():
  with jax.enable_x64(True):
    frozen, logits_fn = problem()
    frozen = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), frozen)
    rng = np.random.default_rng(5)
    state = train.init_state(
      frozen[1], optimizer=train.make_optimizer(1e-3), num_tasks=T, initial_rank_ratio=0.5, prior=0.3
    )
    trainable = jax.tree.map(
      lambda x: jnp.asarray(x + rng.normal(size=x.shape), jnp.float64),
      (state.mask_logits, state.coefficients),
    )
    batches = tuple(jnp.asarray(b, jnp.float64) for b in next(make_batches(0)))
    loss_fn = train.make_loss_fn(
      logits_fn=train.per_task(logits_fn), temperature=TEMP, num_tasks=T, mask_mode="soft"
    )
    loss = jax.jit(lambda tr: loss_fn(tr, frozen, batches)[0])
    grads = jax.grad(loss)(trainable)
    leaves, treedef = jax.tree.flatten(trainable)
    grad_leaves = jax.tree.leaves(grads)
    eps = 1e-5
    checked = 0
    for i, leaf in enumerate(leaves):
      flat = np.asarray(leaf).ravel()
      for j in rng.choice(flat.size, size=min(4, flat.size), replace=False):
        bumped = []
        for sign in (1, -1):
          moved = flat.copy()
          moved[j] += sign * eps
          new_leaves = list(leaves)
          new_leaves[i] = jnp.asarray(moved.reshape(leaf.shape))
          bumped.append(float(loss(jax.tree.unflatten(treedef, new_leaves))))
        fd = (bumped[0] - bumped[1]) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad_leaves[i]).ravel()[j], fd, rtol=1e-5, atol=1e-9)
        checked += 1
    assert checked >= 12 and any(np.abs(g).max() > 1e-4 for g in grad_leaves)


def _flips(before, after):
  return sum(
    int(np.sum((np.asarray(a) > 0) != (np.asarray(b) > 0)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  )


def test_cached_deltas_give_the_plain_rebuilds_loss_and_gradients():
  frozen, logits_fn = problem()
  rng = np.random.default_rng(3)
  state = train.init_state(
    frozen[1],
    optimizer=train.make_optimizer(1e-3),
    num_tasks=T,
    initial_rank_ratio=0.5,
    prior=0.3,
    cache_deltas=True,
  )
  # Logits of both signs and coefficients that differ per task and leaf.
  trainable = jax.tree.map(
    lambda x: jnp.asarray(x + rng.normal(size=x.shape), jnp.float32), (state.mask_logits, state.coefficients)
  )
  deltas = merging.init_deltas(frozen[1], trainable[0])
  loss_fn = train.make_loss_fn(logits_fn=train.per_task(logits_fn), temperature=TEMP, num_tasks=T)
  batches = next(make_batches(0))
  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (plain, _), plain_grads = grad(trainable, frozen, batches)
  (cached, _), cached_grads = grad(trainable, frozen, batches, deltas)
  np.testing.assert_allclose(cached, plain, rtol=1e-6)
  for c, p in zip(jax.tree.leaves(cached_grads), jax.tree.leaves(plain_grads)):
    assert np.abs(p).max() > 1e-3
    np.testing.assert_allclose(c, p, rtol=1e-5, atol=1e-6 * np.abs(p).max())


def test_cached_deltas_follow_the_plain_adam_trajectory_through_mask_flips():
  frozen, logits_fn = problem()
  optimizer = train.make_optimizer(0.05)  # large: masks flip within a few steps
  step = train.make_train_step(
    logits_fn=train.per_task(logits_fn), optimizer=optimizer, temperature=TEMP, num_tasks=T
  )
  states = {
    cache: train.init_state(
      frozen[1], optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5, prior=0.3, cache_deltas=cache
    )
    for cache in (False, True)
  }
  initial = jax.device_get(states[False].mask_logits)
  batch_iter = make_batches(0)
  flips = 0
  for _ in range(50):
    batches = next(batch_iter)
    before = jax.device_get(states[True].mask_logits)
    metrics = {}
    for cache in (False, True):
      states[cache], metrics[cache] = step(frozen, states[cache], batches)
    np.testing.assert_allclose(metrics[True]["loss"], metrics[False]["loss"], rtol=1e-5)
    for c, p in zip(
      jax.tree.leaves((states[True].mask_logits, states[True].coefficients)),
      jax.tree.leaves((states[False].mask_logits, states[False].coefficients)),
    ):
      np.testing.assert_allclose(c, p, rtol=1e-5, atol=1e-5)
    flips += _flips(before, states[True].mask_logits)
  assert flips >= 10 and _flips(initial, states[True].mask_logits) > 0
  # No drift: the carried cache is the one rebuilt from scratch for the final masks.
  fresh = merging.init_deltas(frozen[1], states[True].mask_logits)
  for c, f in zip(jax.tree.leaves(states[True].deltas), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(c, f, rtol=0, atol=1e-6 * np.abs(f).max())


def test_one_forward_equals_per_task_forwards_and_traces_the_body_once():
  frozen, task_logits = problem()
  rng = np.random.default_rng(4)
  heads = [rng.normal(size=(6, c)).astype(np.float32) for c in CLASSES]
  traces = []

  def body(params, x):
    traces.append(x.shape)
    enc = params["enc"]
    return jnp.tanh(x @ enc["a"]["kernel"] + enc["a"]["bias"]) @ enc["b"]["kernel"]

  per_task = train.per_task(lambda params, t, x: body(params, x) @ heads[t])
  one = train.one_forward(body, lambda t, features: features @ heads[t])
  state = train.init_state(
    frozen[1], optimizer=train.make_optimizer(1e-3), num_tasks=T, initial_rank_ratio=0.5, prior=0.3
  )
  trainable = (state.mask_logits, state.coefficients)
  sizes = (4, 2, 3)  # tasks may have batches of different sizes
  batches = tuple(rng.normal(size=(n, 6)).astype(np.float32) for n in sizes)
  out = {}
  for name, logits_fn in (("per_task", per_task), ("one", one)):
    traces.clear()
    loss_fn = train.make_loss_fn(logits_fn=logits_fn, temperature=TEMP, num_tasks=T)
    out[name] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, frozen, batches)
    assert traces == ([(n, 6) for n in sizes] if name == "per_task" else [(sum(sizes), 6)])
  np.testing.assert_allclose(out["one"][0][0], out["per_task"][0][0], rtol=1e-6)
  np.testing.assert_allclose(out["one"][0][1], out["per_task"][0][1], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out["one"][1]), jax.tree.leaves(out["per_task"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tasks_per_call,remat", [(1, False), (3, False), (1, True)])
def test_one_forward_in_groups_of_tasks_equals_per_task_forwards(tasks_per_call, remat):
  frozen, _ = problem()
  rng = np.random.default_rng(5)
  heads = [rng.normal(size=(6, c)).astype(np.float32) for c in CLASSES]
  traces = []

  def body(params, x):
    traces.append(x.shape)
    enc = params["enc"]
    return jnp.tanh(x @ enc["a"]["kernel"] + enc["a"]["bias"]) @ enc["b"]["kernel"]

  per_task = train.per_task(lambda params, t, x: body(params, x) @ heads[t])
  grouped = train.one_forward(
    body, lambda t, features: features @ heads[t], tasks_per_call=tasks_per_call, remat=remat
  )
  state = train.init_state(
    frozen[1], optimizer=train.make_optimizer(1e-3), num_tasks=T, initial_rank_ratio=0.5, prior=0.3
  )
  trainable = (state.mask_logits, state.coefficients)
  batches = tuple(rng.normal(size=(4, 6)).astype(np.float32) for _ in range(T))
  out = {}
  for name, logits_fn in (("per_task", per_task), ("grouped", grouped)):
    traces.clear()
    loss_fn = train.make_loss_fn(logits_fn=logits_fn, temperature=TEMP, num_tasks=T)
    out[name] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, frozen, batches)
  assert traces == [(4 * tasks_per_call, 6)]  # the body is traced once, on k tasks' rows
  loss_fn = train.make_loss_fn(logits_fn=grouped, temperature=TEMP, num_tasks=T)
  program = str(jax.make_jaxpr(loss_fn)(trainable, frozen, batches))
  assert ("remat" in program) == remat  # jax.checkpoint's primitive
  np.testing.assert_allclose(out["grouped"][0][1], out["per_task"][0][1], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out["grouped"][1]), jax.tree.leaves(out["per_task"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  uneven = (batches[0], batches[1], batches[2][:3])
  with pytest.raises(ValueError, match="tasks_per_call"):
    train.make_loss_fn(logits_fn=grouped, temperature=TEMP, num_tasks=T)(trainable, frozen, uneven)


@pytest.mark.parametrize(
  "candidate",
  [c for cache in (False, True) for c in layout.candidates(num_tasks=T, cache_deltas=cache, tower=True)],
  ids=str,
)
def test_every_layout_the_autotune_can_pick_follows_the_plain_adam_trajectory(candidate):
  # The plain step (one traced forward per task, every delta rebuilt) against the candidate layout,
  # through 50 Adam steps large enough that masks flip.
  frozen, _ = problem()
  rng = np.random.default_rng(6)
  heads = [rng.normal(size=(6, c)).astype(np.float32) for c in CLASSES]

  def body(params, x):
    enc = params["enc"]
    return jnp.tanh(x @ enc["a"]["kernel"] + enc["a"]["bias"]) @ enc["b"]["kernel"]

  plain_logits = train.per_task(lambda params, t, x: body(params, x) @ heads[t])
  laid_out = train.one_forward(
    body,
    lambda t, features: features @ heads[t],
    tasks_per_call=candidate.tasks_per_forward or None,
    remat=candidate.remat,
  )
  optimizer = train.make_optimizer(0.05)
  steps, states = {}, {}
  for name, logits_fn, cache in (
    ("plain", plain_logits, False),
    ("laid_out", laid_out, candidate.cache_deltas),
  ):
    steps[name] = train.make_train_step(
      logits_fn=logits_fn, optimizer=optimizer, temperature=TEMP, num_tasks=T
    )
    states[name] = train.init_state(
      frozen[1], optimizer=optimizer, num_tasks=T, initial_rank_ratio=0.5, prior=0.3, cache_deltas=cache
    )
  batch_iter = make_batches(0)
  flips = 0
  for _ in range(50):
    batches = next(batch_iter)
    before = jax.device_get(states["plain"].mask_logits)
    metrics = {}
    for name in steps:
      states[name], metrics[name] = steps[name](frozen, states[name], batches)
    np.testing.assert_allclose(metrics["laid_out"]["loss"], metrics["plain"]["loss"], rtol=1e-5)
    for c, p in zip(
      jax.tree.leaves((states["laid_out"].mask_logits, states["laid_out"].coefficients)),
      jax.tree.leaves((states["plain"].mask_logits, states["plain"].coefficients)),
    ):
      np.testing.assert_allclose(c, p, rtol=1e-5, atol=1e-5)
    flips += _flips(before, states["plain"].mask_logits)
  assert flips >= 10


def test_a_cache_of_the_wrong_form_is_refused_by_key():
  frozen, _ = problem()
  state = train.init_state(
    frozen[1], optimizer=train.make_optimizer(1e-3), num_tasks=T, initial_rank_ratio=1.0, prior=0.3
  )
  args = (frozen[0], frozen[1], state.mask_logits, state.coefficients)
  cache = merging.init_deltas(frozen[1], state.mask_logits)
  bare = jax.tree.map(lambda c: c.deltas, cache, is_leaf=lambda x: isinstance(x, merging.Cached))
  with pytest.raises(ValueError, match=r"deltas\['enc/a/kernel'\] is a .*Array.*expected a merging.Cached"):
    merging.merge(*args, temperature=TEMP, deltas=bare)
  cache["enc"]["a"]["kernel"] = cache["enc"]["a"]["kernel"]._replace(ut=jnp.zeros((T, 4, 4)))
  with pytest.raises(
    ValueError, match=r"deltas.ut\['enc/a/kernel'\] has shape \(3, 4, 4\); expected \(3, 4, 6\)"
  ):
    merging.merge(*args, temperature=TEMP, deltas=cache)
