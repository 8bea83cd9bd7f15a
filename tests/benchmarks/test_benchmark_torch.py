"""The PyTorch baseline of the official AdaRank step equals adarank_jax's step on the same inputs."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adarank_jax.benchmarks import step as benchmark
from adarank_jax.benchmarks import torch_step as benchmark_torch
from adarank_jax.core import decomposition, task_vectors, train, tree_util

ARCH = os.path.join(os.path.dirname(benchmark_torch.__file__), "..", "digits", "tiny_clip_quick.json")
TASKS, BATCH, CLASSES = 3, 2, 5
PRIOR, TEMPERATURE, LR, ADAM_EPS = 0.3, 10.0, 1e-3, 1e-8
GRAD_RTOL, GRAD_SCALED_ATOL = 1e-3, 1e-4  # float32 rounding; atol relative to the leaf's max |grad|
# The loss: float32 entropies of logits scaled by 100, summed in another order on each side (an AVX2-only
# EPYC differs by 1.1e-5 at rho 0.5).
LOSS_RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  # Two OpenMP threads on a busy 2-core machine make each tiny torch.linalg.svd take ~1 s.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs():
  # Noise 0.05: task vectors large enough that masking components visibly changes the loss.
  return benchmark.make_inputs(ARCH, tasks=TASKS, batch=BATCH, classes=CLASSES, noise=0.05)


@pytest.fixture(scope="module")
def jax_side(inputs):
  """adarank_jax on `inputs`: frozen (origin, factors), batches, jitted loss-and-grad, train step."""
  origin, tau = task_vectors.task_vectors(
    inputs.pretrained, [inputs.finetuned(t) for t in range(TASKS)], origin="pretrained"
  )
  keys = benchmark_torch.openclip_keys(inputs.pretrained)
  select = tree_util.unflatten({path: benchmark_torch.is_decomposed(key) for path, key in keys.items()})
  factors = decomposition.decompose(tau, select)
  steps, value_and_grads = {}, {}
  for forward in benchmark.FORWARDS:
    logits_fn = benchmark.logits_fn(inputs.graphdef, inputs.heads, forward)
    loss_fn = train.make_loss_fn(logits_fn=logits_fn, temperature=TEMPERATURE, num_tasks=TASKS)
    steps[forward] = train.make_train_step(
      logits_fn=logits_fn, optimizer=train.make_optimizer(LR), temperature=TEMPERATURE, num_tasks=TASKS
    )
    value_and_grads[forward] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  return types.SimpleNamespace(
    frozen=(origin, factors),
    factors=factors,
    steps=steps,
    value_and_grads=value_and_grads,
    batches=tuple(jnp.asarray(x) for x in inputs.images),
  )


def _init_state(factors, rho, cache_deltas=False):
  return train.init_state(
    factors,
    optimizer=train.make_optimizer(LR),
    num_tasks=TASKS,
    initial_rank_ratio=rho,
    prior=PRIOR,
    cache_deltas=cache_deltas,
  )


def _assert_close_per_leaf(actual, expected, *, rtol, scale_atol, what):
  assert sorted(actual) == sorted(expected), what
  for path, want in expected.items():
    want = np.asarray(want)
    got = actual[path]
    assert got.shape == want.shape, (what, path)
    atol = scale_atol * float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


def _grad_atol(want):
  return GRAD_SCALED_ATOL * float(np.abs(want).max())


def _assert_adam_step_close(actual, expected, grads, *, what):
  """Values after Adam's first step, lr * g / (|g| + eps), which amplifies a gradient error dg by
  lr * eps / (|g| + eps)^2: the tolerance is that bound for the gradient tolerance, plus rounding."""
  assert sorted(actual) == sorted(expected), what
  for path, want in expected.items():
    want, g = np.asarray(want), np.abs(np.asarray(grads[path]))
    dg = GRAD_RTOL * g + _grad_atol(g)
    tol = LR * ADAM_EPS * dg / (g + ADAM_EPS) ** 2 + 4 * np.spacing(np.abs(want))
    err = np.abs(actual[path] - want)
    assert np.all(err <= tol), (what, path, float(err.max()), float((err / tol).max()))


def test_decomposed_keys_follow_the_official_rule_and_the_jax_benchmark(inputs):
  keys = benchmark_torch.openclip_keys(inputs.pretrained)
  visual = benchmark_torch.openclip_visual(ARCH)
  assert sorted(keys.values()) == sorted(visual.state_dict())
  decomposed = sorted(k for k in keys.values() if benchmark_torch.is_decomposed(k))
  assert len(decomposed) == 4 * inputs.vision.layers
  assert {k.split(".", 3)[3] for k in decomposed} == {
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
  }
  jax_select = tree_util.flatten(tree_util.select(inputs.pretrained, benchmark.SVD_PATTERNS))
  assert {p: benchmark_torch.is_decomposed(k) for p, k in keys.items()} == jax_select


def test_inputs_are_deterministic_and_laid_out_as_documented(inputs):
  again = benchmark.make_inputs(ARCH, tasks=TASKS, batch=BATCH, classes=CLASSES, noise=0.05)
  for a, b in zip(
    jax.tree.leaves((inputs.pretrained, [inputs.finetuned(t) for t in range(TASKS)])),
    jax.tree.leaves((again.pretrained, [again.finetuned(t) for t in range(TASKS)])),
  ):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(inputs.heads, again.heads)
  np.testing.assert_array_equal(inputs.images, again.images)
  size = inputs.vision.image_size
  assert inputs.images.shape == (TASKS, BATCH, size, size, 3)
  assert inputs.images.dtype == np.float32 and inputs.heads.dtype == np.float32
  assert inputs.heads.shape == (TASKS, inputs.vision.output_dim, CLASSES)
  np.testing.assert_allclose(np.linalg.norm(inputs.heads, axis=1), 100.0, rtol=1e-5)
  noise = np.std(
    tree_util.flatten(inputs.finetuned(1))["proj"] - tree_util.flatten(inputs.pretrained)["proj"]
  )
  assert 0.04 < noise < 0.06


@pytest.mark.parametrize(
  "rho,cache_deltas,forward", [(1.0, False, "per_task"), (0.5, False, "one"), (1.0, True, "one")]
)
def test_torch_step_equals_jax_step(inputs, jax_side, rho, cache_deltas, forward):
  state = _init_state(jax_side.factors, rho, cache_deltas)
  official, images = benchmark_torch.build(
    inputs, initial_rank_ratio=rho, prior=PRIOR, temperature=TEMPERATURE, lr=LR
  )

  # Same initial trainables, keyed by the same flat Flax paths.
  masks0, coefs0 = official.values()
  _assert_close_per_leaf(
    masks0, tree_util.flatten(state.mask_logits), rtol=0, scale_atol=0, what="initial mask logits"
  )
  _assert_close_per_leaf(
    coefs0, tree_util.flatten(state.coefficients), rtol=0, scale_atol=0, what="initial coefficients"
  )

  # Loss and gradients.
  (loss, _), (mask_grads, coef_grads) = jax_side.value_and_grads[forward](
    (state.mask_logits, state.coefficients), jax_side.frozen, jax_side.batches, state.deltas
  )
  torch_loss, torch_mask_grads, torch_coef_grads = benchmark_torch.loss_and_grads(official, images)
  np.testing.assert_allclose(torch_loss, float(loss), rtol=LOSS_RTOL)
  mask_grads, coef_grads = tree_util.flatten(mask_grads), tree_util.flatten(coef_grads)
  _assert_close_per_leaf(
    torch_mask_grads, mask_grads, rtol=GRAD_RTOL, scale_atol=GRAD_SCALED_ATOL, what="mask-logit gradient"
  )
  _assert_close_per_leaf(
    torch_coef_grads, coef_grads, rtol=GRAD_RTOL, scale_atol=GRAD_SCALED_ATOL, what="coefficient gradient"
  )
  if rho < 1:  # the masks matter: the full-rank start has another loss
    full = _init_state(jax_side.factors, 1.0)
    (full_loss, _), _ = jax_side.value_and_grads[forward](
      (full.mask_logits, full.coefficients), jax_side.frozen, jax_side.batches
    )
    assert abs(float(full_loss) - float(loss)) > 1e-3

  # One Adam step on both sides.
  new_state, metrics = jax_side.steps[forward](jax_side.frozen, state, jax_side.batches)
  step_loss = official.step(images)
  np.testing.assert_allclose(step_loss, float(metrics["loss"]), rtol=LOSS_RTOL)
  masks1, coefs1 = official.values()
  _assert_adam_step_close(
    masks1, tree_util.flatten(new_state.mask_logits), mask_grads, what="mask logits after one step"
  )
  _assert_adam_step_close(
    coefs1, tree_util.flatten(new_state.coefficients), coef_grads, what="coefficients after one step"
  )
  moved = max(np.abs(masks1[p] - masks0[p]).max() for p in masks0)
  assert moved == pytest.approx(LR, rel=1e-2)


def test_cli_main_runs_at_tiny_size():
  threads = torch.get_num_threads()
  try:
    result = benchmark_torch.main(
      ["--arch", ARCH, "--tasks", "2", "--batch", "2", "--steps", "2", "--threads", "1"]
    )
  finally:
    torch.set_num_threads(threads)
  for key in (
    "task_vectors_s",
    "decompose_s",
    "first_step_s",
    "step_s_median",
    "steps_per_s",
    "host_peak_rss_gb",
    "loss",
    "torch_threads",
  ):
    assert key in result, key
  assert np.isfinite(result["loss"]) and result["steps_per_s"] > 0
