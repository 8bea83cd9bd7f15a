"""Per-task thin SVD of selected task-vector matrices, against numpy; host (LAPACK) vs XLA paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adarank_jax.core import tree_util
from adarank_jax.core.decomposition import (
  SVD,
  decompose,
  decompose_streaming,
  is_svd,
  reconstruct,
  resolve_method,
)
from adarank_jax.core.task_vectors import task_vectors

T = 3
METHODS = ("host", "xla")


@pytest.fixture(name="tau")
def _tau():
  rng = np.random.default_rng(1)
  f32 = lambda *shape: rng.normal(size=(T,) + shape).astype(np.float32)
  # Two (6, 4) matrices share one batched SVD call; (4, 6) gets its own.
  return {
    "layers": {
      0: {"kernel": f32(6, 4), "bias": f32(4)},
      1: {"kernel": f32(6, 4), "bias": f32(4)},
      2: {"kernel": f32(4, 6)},
    },
    "proj": f32(4, 6),
  }


def _select(tau):
  return tree_util.select(tau, [r"layers/\d+/kernel"])


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reconstructs_tau(tau, method):
  factors = decompose(tau, _select(tau), method=method)
  flat, tau_flat = tree_util.flatten(factors), tree_util.flatten(tau)
  assert {p for p, x in flat.items() if is_svd(x)} == {f"layers/{i}/kernel" for i in range(3)}
  for path, leaf in flat.items():
    if is_svd(leaf):
      m, n = tau_flat[path].shape[1:]
      r = min(m, n)
      assert (leaf.u.shape, leaf.s.shape, leaf.vt.shape) == ((T, m, r), (T, r), (T, r, n))
      np.testing.assert_allclose(reconstruct(leaf), tau_flat[path], atol=1e-5)
      np.testing.assert_allclose(leaf.s, np.linalg.svd(tau_flat[path], compute_uv=False), rtol=1e-5)
    else:
      np.testing.assert_array_equal(leaf, tau_flat[path])


@pytest.mark.parametrize("method", METHODS)
def test_truncation_is_the_best_rank_k_approximation(tau, method):
  factors = decompose(tau, _select(tau), rank=2, method=method)
  svd = factors["layers"][2]["kernel"]
  assert (svd.u.shape, svd.s.shape, svd.vt.shape) == ((T, 4, 2), (T, 2), (T, 2, 6))
  for t in range(T):
    u, s, vt = np.linalg.svd(tau["layers"][2]["kernel"][t], full_matrices=False)
    np.testing.assert_allclose(reconstruct(svd)[t], (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
  # A rank above min(m, n) keeps every component.
  assert decompose(tau, _select(tau), rank=50, method=method)["layers"][0]["kernel"].s.shape == (T, 4)


@pytest.mark.parametrize("method", METHODS)
def test_storage_dtype(tau, method):
  factors = decompose(tau, _select(tau), dtype=jnp.bfloat16, method=method)
  leaves = jax.tree.leaves(factors)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  svd = factors["layers"][0]["kernel"]
  np.testing.assert_allclose(reconstruct(svd), tau["layers"][0]["kernel"], atol=0.05)


def test_is_svd_makes_svd_leaves_atomic(tau):
  factors = decompose(tau, _select(tau))
  kinds = jax.tree.map(lambda x: "svd" if is_svd(x) else "dense", factors, is_leaf=is_svd)
  assert kinds["layers"][0] == {"kernel": "svd", "bias": "dense"}
  assert isinstance(factors["layers"][1]["kernel"], SVD)


@pytest.mark.parametrize("method", METHODS)
def test_errors(tau, method):
  with pytest.raises(ValueError, match="select.*proj"):
    decompose(tau, {"layers": _select(tau)["layers"]}, method=method)
  with pytest.raises(ValueError, match=r"'layers/0/bias'.*\(tasks, m, n\)"):
    decompose(tau, tree_util.select(tau, [r"layers/0/bias"]), method=method)
  with pytest.raises(ValueError, match="rank=0"):
    decompose(tau, _select(tau), rank=0, method=method)
  with pytest.raises(ValueError, match=r"disagree on the number of tasks: \[2, 3\]"):
    decompose({**tau, "proj": tau["proj"][:2]}, _select(tau), method=method)


def _tasks(tau, t):
  return jax.tree.map(lambda x: x[t], tau)


def _assert_trees_equal(a, b):
  flat_a, flat_b = tree_util.flatten(a), tree_util.flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    assert is_svd(flat_a[path]) == is_svd(flat_b[path]), path
    for x, y in zip(jax.tree.leaves(flat_a[path]), jax.tree.leaves(flat_b[path])):
      assert x.dtype == y.dtype and x.shape == y.shape, path
      np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), path)


def test_auto_is_host_on_cpu_and_xla_on_accelerators():
  assert resolve_method("auto", backend="cpu") == "host"
  assert resolve_method("auto", backend="gpu") == resolve_method("auto", backend="tpu") == "xla"
  assert resolve_method("xla", backend="cpu") == "xla"
  assert resolve_method("host", backend="gpu") == "host"
  assert resolve_method("auto") == ("host" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match="method='torch'"):
    resolve_method("torch")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_host_and_xla_agree(dtype):
  """Wide, tall and square matrices, float32 and bfloat16 task vectors, with a decaying spectrum."""
  rng = np.random.default_rng(5)

  def matrices(m, n):  # singular values spread over 3 decades, like a task vector's
    q1 = np.linalg.qr(rng.normal(size=(T, m, m)))[0]
    q2 = np.linalg.qr(rng.normal(size=(T, n, n)))[0]
    r = min(m, n)
    return (q1[..., :r] * np.logspace(0, -3, r)) @ np.swapaxes(q2[..., :r], 1, 2)

  tau = {
    "wide": matrices(24, 56),
    "tall": matrices(56, 24),
    "square": matrices(32, 32),
    "bias": rng.normal(size=(T, 24)),
  }
  tau = jax.tree.map(lambda x: jnp.asarray(x, dtype), tau)
  select = tree_util.select(tau, ["wide", "tall", "square"])
  host, xla = (decompose(tau, select, method=m) for m in METHODS)
  for path in ("wide", "tall", "square"):
    h, x = host[path], xla[path]
    assert all(isinstance(a, jax.Array) and a.dtype == dtype for a in (*h, *x))
    assert [a.shape for a in h] == [a.shape for a in x]
    s = np.asarray(h.s, np.float32)
    assert np.all(np.diff(s, axis=-1) <= 0)  # descending
    exact = np.linalg.svd(np.asarray(tau[path], np.float64), compute_uv=False)
    if dtype == jnp.float32:
      np.testing.assert_allclose(s, x.s, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(s, exact, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(reconstruct(h), tau[path], atol=1e-6)
      np.testing.assert_allclose(reconstruct(h), reconstruct(x), atol=1e-6)
      # Orthonormal singular vectors (the sign of each pair may differ between the two paths).
      eye = np.broadcast_to(np.eye(h.s.shape[-1]), (T,) + (h.s.shape[-1],) * 2)
      np.testing.assert_allclose(np.swapaxes(h.u, 1, 2) @ h.u, eye, atol=1e-5)
      np.testing.assert_allclose(h.vt @ np.swapaxes(h.vt, 1, 2), eye, atol=1e-5)
    else:  # same float32 SVD, each path rounds its factors to bfloat16
      np.testing.assert_allclose(s, np.asarray(x.s, np.float32), rtol=1e-2)
      np.testing.assert_allclose(reconstruct(h), reconstruct(x), atol=2e-2)
  np.testing.assert_array_equal(np.asarray(host["bias"], np.float32), np.asarray(xla["bias"], np.float32))


@pytest.mark.parametrize(
  "method,rank,dtype", [("host", None, None), ("host", 2, jnp.bfloat16), ("xla", 2, jnp.bfloat16)]
)
def test_streaming_equals_decompose(tau, method, rank, dtype):
  select = _select(tau)
  expected = decompose(tau, select, rank=rank, dtype=dtype, method=method)
  # A generator of per-task trees, one alive at a time; numpy leaves for one task, jax for another.
  stream = (jax.tree.map(jnp.asarray, _tasks(tau, t)) if t % 2 else _tasks(tau, t) for t in range(T))
  streamed = decompose_streaming(select, stream, num_tasks=T, rank=rank, dtype=dtype, method=method)
  _assert_trees_equal(streamed, expected)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(streamed))


def test_host_results_do_not_depend_on_workers(tau):
  select = _select(tau)
  one = decompose(tau, select, method="host", workers=1)
  _assert_trees_equal(decompose(tau, select, method="host", workers=3), one)
  stream = (_tasks(tau, t) for t in range(T))
  _assert_trees_equal(decompose_streaming(select, stream, num_tasks=T, method="host", workers=2), one)


@pytest.mark.parametrize("method", METHODS)
def test_streaming_errors(tau, method):
  select = _select(tau)
  tasks = [_tasks(tau, t) for t in range(T)]
  with pytest.raises(ValueError, match="got 2 task vectors; expected num_tasks=3"):
    decompose_streaming(select, tasks[:2], num_tasks=T, method=method)
  with pytest.raises(ValueError, match="more than num_tasks=2"):
    decompose_streaming(select, tasks, num_tasks=2, method=method)
  bad = jax.tree.map(lambda x: x, tasks[1])
  bad["proj"] = bad["proj"][:, :5]
  with pytest.raises(tree_util.StructureError, match=r"proj: expected shape \(4, 6\), got \(4, 5\)"):
    decompose_streaming(select, [tasks[0], bad, tasks[2]], num_tasks=T, method=method)
  with pytest.raises(ValueError, match=r"'layers/0/bias'.*\(tasks, m, n\)"):
    decompose_streaming(tree_util.select(tau, [r"layers/0/bias"]), tasks, num_tasks=T, method=method)


def test_host_path_names_a_matrix_it_cannot_decompose(tau):
  tau = jax.tree.map(np.copy, tau)
  tau["layers"][1]["kernel"][2, 0, 0] = np.nan
  with pytest.raises(ValueError, match="SVD of 'layers/1/kernel', task 2"):
    decompose(tau, _select(tau), method="host")


@pytest.mark.parametrize("origin", ["pretrained", "average"])
def test_streaming_from_finetuned_models_matches_task_vectors(origin):
  """The caller's side of streaming: origin first (for CART the mean of the fine-tuned models, one
  model at a time), then tau_t = theta_t - origin made and dropped one task at a time."""
  rng = np.random.default_rng(2)
  base = {
    "enc": {
      "kernel": rng.normal(size=(6, 4)).astype(np.float32),
      "bias": rng.normal(size=4).astype(np.float32),
    }
  }
  finetuned = [
    jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(T)
  ]
  origin_tree, tau = task_vectors(base, finetuned, origin=origin)
  select = tree_util.select(origin_tree, [r"enc/kernel"])
  expected = decompose(tau, select)
  if origin == "average":
    total = None
    for theta in finetuned:  # a running sum, one model at a time
      total = theta if total is None else jax.tree.map(jnp.add, total, theta)
    mean = jax.tree.map(lambda x: x / T, total)
  else:
    mean = base
  np.testing.assert_allclose(mean["enc"]["kernel"], origin_tree["enc"]["kernel"], rtol=1e-6)
  stream = (jax.tree.map(jnp.subtract, theta, origin_tree) for theta in finetuned)
  _assert_trees_equal(decompose_streaming(select, stream, num_tasks=T), expected)
