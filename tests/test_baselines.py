"""Static merges against independent numpy formulas (loops over tasks, keys and entries)."""

import jax
import numpy as np
import pytest

from adarank_jax import baselines, tree_util
from adarank_jax.decomposition import decompose
from adarank_jax.task_vectors import task_vectors

T = 3
SVD_KEYS = [r'.*/kernel']


@pytest.fixture(name='models')
def _models():
  rng = np.random.default_rng(3)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {'enc': {0: {'kernel': f32(6, 4), 'bias': f32(4)}, 1: {'kernel': f32(4, 6)}},
          'proj': f32(4, 5), 'ids': np.arange(3, dtype=np.int32)}
  finetuned = [jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape).astype(np.float32)
                            if x.dtype.kind == 'f' else x, base) for _ in range(T)]
  return base, finetuned


def _flat(tree):
  return {k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == 'f' else np.asarray(v)
          for k, v in tree_util.flatten(tree).items()}


def _assert_close(tree, expected, atol=1e-5):
  flat = tree_util.flatten(tree)
  assert set(flat) == set(expected)
  for path, value in expected.items():
    np.testing.assert_allclose(np.asarray(flat[path]), value, atol=atol, err_msg=path)


def test_zero_shot_and_weight_average(models):
  base, finetuned = models
  assert baselines.zero_shot(base) is base
  flats = [_flat(f) for f in finetuned]
  expected = {k: sum(f[k] for f in flats) / T if v.dtype.kind == 'f' else v
              for k, v in flats[0].items()}
  _assert_close(baselines.weight_average(finetuned), expected)


def test_task_arithmetic(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin='pretrained')
  b, flats = _flat(base), [_flat(f) for f in finetuned]
  expected = {}
  for k, v in b.items():
    expected[k] = v if v.dtype.kind != 'f' else v + 0.3 * sum(f[k] - v for f in flats)
  _assert_close(baselines.task_arithmetic(origin, tau, scaling=0.3), expected)
  # The same merge from full-rank factors.
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  _assert_close(baselines.task_arithmetic(origin, factors, scaling=0.3), expected)


@pytest.mark.parametrize('rank_ratio', [0.3, 0.6])
def test_cart_matches_numpy(models, rank_ratio):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin='average')
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  flats = [_flat(f) for f in finetuned]
  expected = {}
  for k, v in flats[0].items():
    if v.dtype.kind != 'f':
      expected[k] = v
      continue
    avg = sum(f[k] for f in flats) / T
    total = np.zeros_like(avg)
    for f in flats:
      centred = f[k] - avg
      if k.endswith('kernel'):
        u, s, vt = np.linalg.svd(centred, full_matrices=False)
        keep = max(1, int(rank_ratio * min(centred.shape)))
        centred = (u[:, :keep] * s[:keep]) @ vt[:keep]
      total += centred
    expected[k] = avg + 2.0 * total
  _assert_close(baselines.cart(origin, factors, scaling=2.0, rank_ratio=rank_ratio), expected)


@pytest.mark.parametrize('scaling', [0.3, 2.0, -1.5])
def test_cart_at_full_rank_is_the_weight_average(models, scaling):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin='average')
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  merged = baselines.cart(origin, factors, scaling=scaling, rank_ratio=1.0)
  _assert_close(merged, _flat(baselines.weight_average(finetuned)))


def _naive_ties(base, finetuned, density, scaling):
  b = {k: v for k, v in _flat(base).items() if v.dtype.kind == 'f'}
  keys = sorted(b)
  vectors = [np.concatenate([(_flat(f)[k] - b[k]).ravel() for k in keys]) for f in finetuned]
  trimmed = []
  for vec in vectors:
    keep = int(density * vec.size)
    kept = np.zeros_like(vec)
    top = np.argsort(-np.abs(vec))[:keep]
    kept[top] = vec[top]
    trimmed.append(kept)
  merged = np.zeros_like(vectors[0])
  for i in range(merged.size):
    column = [tr[i] for tr in trimmed]
    sign = np.sign(sum(column))
    agree = [x for x in column if x != 0 and np.sign(x) == sign]
    merged[i] = sum(agree) / len(agree) if agree else 0.0
  expected, offset = {}, 0
  for k in keys:
    size = b[k].size
    expected[k] = b[k] + scaling * merged[offset:offset + size].reshape(b[k].shape)
    offset += size
  expected['ids'] = base['ids']
  return expected


@pytest.mark.parametrize('density, scaling', [(0.2, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_ties_matches_numpy(models, density, scaling):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin='pretrained')
  merged = baselines.ties(origin, tau, density=density, scaling=scaling)
  _assert_close(merged, _naive_ties(base, finetuned, density, scaling))


def test_ties_of_one_model_at_full_density_is_that_model(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned[:1], origin='pretrained')
  _assert_close(baselines.ties(origin, tau, density=1.0), _flat(finetuned[0]))


def test_errors(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin='pretrained')
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  with pytest.raises(ValueError, match="ties: expects dense.*'enc/0/kernel'"):
    baselines.ties(origin, factors)
  with pytest.raises(ValueError, match='density'):
    baselines.ties(origin, tau, density=0.0)
  with pytest.raises(ValueError, match='rank_ratio'):
    baselines.cart(origin, factors, scaling=1.0, rank_ratio=0.0)
  with pytest.raises(ValueError, match='origin lacks.*extra'):
    baselines.task_arithmetic(origin, dict(tau, extra=np.zeros((T, 2))), scaling=0.3)
