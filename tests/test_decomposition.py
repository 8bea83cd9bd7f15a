"""Per-task thin SVD of selected task-vector matrices, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax import tree_util
from adarank_jax.decomposition import SVD, decompose, is_svd, reconstruct

T = 3


@pytest.fixture(name='tau')
def _tau():
  rng = np.random.default_rng(1)
  f32 = lambda *shape: rng.normal(size=(T,) + shape).astype(np.float32)
  # Two (6, 4) matrices share one batched SVD call; (4, 6) gets its own.
  return {'layers': {0: {'kernel': f32(6, 4), 'bias': f32(4)},
                     1: {'kernel': f32(6, 4), 'bias': f32(4)},
                     2: {'kernel': f32(4, 6)}},
          'proj': f32(4, 6)}


def _select(tau):
  return tree_util.select(tau, [r'layers/\d+/kernel'])


def test_full_rank_reconstructs_tau(tau):
  factors = decompose(tau, _select(tau))
  flat, tau_flat = tree_util.flatten(factors), tree_util.flatten(tau)
  assert {p for p, x in flat.items() if is_svd(x)} == {f'layers/{i}/kernel' for i in range(3)}
  for path, leaf in flat.items():
    if is_svd(leaf):
      m, n = tau_flat[path].shape[1:]
      r = min(m, n)
      assert (leaf.u.shape, leaf.s.shape, leaf.vt.shape) == ((T, m, r), (T, r), (T, r, n))
      np.testing.assert_allclose(reconstruct(leaf), tau_flat[path], atol=1e-5)
      np.testing.assert_allclose(leaf.s, np.linalg.svd(tau_flat[path], compute_uv=False),
                                 rtol=1e-5)
    else:
      np.testing.assert_array_equal(leaf, tau_flat[path])


def test_truncation_is_the_best_rank_k_approximation(tau):
  factors = decompose(tau, _select(tau), rank=2)
  svd = factors['layers'][2]['kernel']
  assert (svd.u.shape, svd.s.shape, svd.vt.shape) == ((T, 4, 2), (T, 2), (T, 2, 6))
  for t in range(T):
    u, s, vt = np.linalg.svd(tau['layers'][2]['kernel'][t], full_matrices=False)
    np.testing.assert_allclose(reconstruct(svd)[t], (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
  # A rank above min(m, n) keeps every component.
  assert decompose(tau, _select(tau), rank=50)['layers'][0]['kernel'].s.shape == (T, 4)


def test_storage_dtype(tau):
  factors = decompose(tau, _select(tau), dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(factors)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  svd = factors['layers'][0]['kernel']
  np.testing.assert_allclose(reconstruct(svd), tau['layers'][0]['kernel'], atol=0.05)


def test_is_svd_makes_svd_leaves_atomic(tau):
  factors = decompose(tau, _select(tau))
  kinds = jax.tree.map(lambda x: 'svd' if is_svd(x) else 'dense', factors, is_leaf=is_svd)
  assert kinds['layers'][0] == {'kernel': 'svd', 'bias': 'dense'}
  assert isinstance(factors['layers'][1]['kernel'], SVD)


def test_errors(tau):
  with pytest.raises(ValueError, match="select.*proj"):
    decompose(tau, {'layers': _select(tau)['layers']})
  with pytest.raises(ValueError, match=r"'layers/0/bias'.*\(tasks, m, n\)"):
    decompose(tau, tree_util.select(tau, [r'layers/0/bias']))
  with pytest.raises(ValueError, match='rank=0'):
    decompose(tau, _select(tau), rank=0)
