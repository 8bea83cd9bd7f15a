"""Task vectors (TA and CART origins) and the weight average, against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import tree_util
from adarank_jax.core.task_vectors import task_vectors, weight_average

T = 3


def _tree(rng, scale=1.0):
  return {
    "blocks": {
      0: {
        "kernel": scale * rng.normal(size=(6, 4)).astype(np.float32),
        "bias": scale * rng.normal(size=(4,)).astype(np.float32),
      },
      1: {"kernel": scale * rng.normal(size=(4, 6)).astype(np.float32)},
    },
    "head": scale * rng.normal(size=(6, 2)).astype(np.float32),
    "position_ids": np.arange(5, dtype=np.int32),
  }


@pytest.fixture(name="models")
def _models():
  rng = np.random.default_rng(0)
  base = _tree(rng)
  finetuned = []
  for _ in range(T):
    noise = _tree(rng, scale=0.1)
    tree = {
      path: (leaf + noise_leaf if leaf.dtype.kind == "f" else leaf)
      for (path, leaf), noise_leaf in zip(tree_util.flatten(base).items(), tree_util.flatten(noise).values())
    }
    finetuned.append(tree_util.unflatten(tree))
  return base, finetuned


def test_task_arithmetic_origin(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  base_flat, tau_flat, origin_flat = map(tree_util.flatten, (base, tau, origin))
  assert set(tau_flat) == {"blocks/0/kernel", "blocks/0/bias", "blocks/1/kernel", "head"}
  for path, leaf in tau_flat.items():
    expected = np.stack([tree_util.flatten(f)[path] - base_flat[path] for f in finetuned])
    assert leaf.shape == (T,) + base_flat[path].shape
    np.testing.assert_allclose(leaf, expected, atol=1e-6)
  for path, leaf in base_flat.items():
    np.testing.assert_array_equal(origin_flat[path], leaf)
  assert origin["blocks"][1]["kernel"] is base["blocks"][1]["kernel"]  # int keys survive


def test_cart_origin_is_the_average_and_vectors_are_centred(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="average")
  origin_flat, tau_flat = tree_util.flatten(origin), tree_util.flatten(tau)
  for path, leaf in tau_flat.items():
    stack = np.stack([tree_util.flatten(f)[path] for f in finetuned])
    np.testing.assert_allclose(origin_flat[path], stack.mean(0), atol=1e-6)
    np.testing.assert_allclose(leaf, stack - stack.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(leaf).sum(0), 0.0, atol=1e-6)
  np.testing.assert_array_equal(origin_flat["position_ids"], base["position_ids"])


def test_include_restricts_the_task_vectors(models):
  base, finetuned = models
  include = tree_util.select(base, [r"blocks/.*"])
  origin, tau = task_vectors(base, finetuned, origin="average", include=include)
  assert set(tree_util.flatten(tau)) == {"blocks/0/kernel", "blocks/0/bias", "blocks/1/kernel"}
  expected_head = np.mean([f["head"] for f in finetuned], axis=0)
  np.testing.assert_allclose(origin["head"], expected_head, atol=1e-6)  # origin covers every leaf


def test_weight_average(models):
  _, finetuned = models
  average = weight_average(finetuned)
  for path, leaf in tree_util.flatten(average).items():
    stack = np.stack([tree_util.flatten(f)[path] for f in finetuned])
    if stack.dtype.kind == "f":
      np.testing.assert_allclose(leaf, stack.mean(0), atol=1e-6)
    else:
      np.testing.assert_array_equal(leaf, stack[0])


def test_keeps_bfloat16():
  base = {"w": jnp.ones((4, 3), jnp.bfloat16)}
  finetuned = [{"w": jnp.full((4, 3), 1.5, jnp.bfloat16)}, {"w": jnp.full((4, 3), 2.5, jnp.bfloat16)}]
  origin, tau = task_vectors(base, finetuned, origin="average")
  assert origin["w"].dtype == jnp.bfloat16 and tau["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(origin["w"], np.float32), 2.0)
  np.testing.assert_array_equal(np.asarray(tau["w"][0], np.float32), -0.5)


def test_errors_name_the_problem(models):
  base, finetuned = models
  bad = dict(finetuned[1], head=np.zeros((5, 2), np.float32))
  with pytest.raises(tree_util.StructureError, match=r"finetuned\[1\].*head"):
    task_vectors(base, [finetuned[0], bad], origin="pretrained")
  with pytest.raises(ValueError, match="origin="):
    task_vectors(base, finetuned, origin="mean")
  with pytest.raises(ValueError, match="no fine-tuned"):
    task_vectors(base, [], origin="pretrained")
  with pytest.raises(ValueError, match="include.*head"):
    task_vectors(
      base,
      finetuned,
      origin="pretrained",
      include={"blocks": tree_util.select(base["blocks"], [".*"]), "position_ids": True},
    )
