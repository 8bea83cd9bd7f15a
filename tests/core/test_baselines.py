"""Static merges against independent numpy formulas written from the papers' equations.

The numpy references below never call the project's merge code: they work in float64 on plain
arrays, one task and one key at a time, in the papers' (out, in) layout where it matters.
"""

import functools
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from adarank_jax.core import baselines, decomposition, tree_util
from adarank_jax.core.task_vectors import task_vectors
from adarank_jax.interop import openclip_config
from adarank_jax.models import clip, functional

T = 3
SVD_KEYS = [r".*/kernel"]
CLIP_SVD_KEYS = [
  r"transformer/resblocks/\d+/attn/(in_proj|out_proj)/kernel",
  r"transformer/resblocks/\d+/mlp/(c_fc|c_proj)/kernel",
]
TINY_CLIP = os.path.join(os.path.dirname(clip.__file__), "..", "digits", "tiny_clip_quick.json")


@pytest.fixture(name="models")
def _models():
  rng = np.random.default_rng(3)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  base = {
    "enc": {0: {"kernel": f32(6, 4), "bias": f32(4)}, 1: {"kernel": f32(4, 6)}},
    "proj": f32(4, 5),
    "ids": np.arange(3, dtype=np.int32),
  }
  finetuned = [
    jax.tree.map(
      lambda x: x + 0.2 * rng.normal(size=x.shape).astype(np.float32) if x.dtype.kind == "f" else x, base
    )
    for _ in range(T)
  ]
  return base, finetuned


@pytest.fixture(name="clip_models", scope="module")
def _clip_models():
  """A random-init tiny CLIP image tower and T noisy 'fine-tuned' copies (numpy float32 trees)."""
  config = openclip_config.load_config(TINY_CLIP).vision
  _, params = functional.split(clip.VisionTransformer(config, rngs=nnx.Rngs(0)))
  base = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(7)
  finetuned = [
    jax.tree.map(lambda x: (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32), base) for _ in range(T)
  ]
  return base, finetuned


def _flat(tree):
  return {
    k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
    for k, v in tree_util.flatten(tree).items()
  }


def _assert_close(tree, expected, atol=1e-5, rtol=0.0):
  flat = tree_util.flatten(tree)
  assert set(flat) == set(expected)
  for path, value in expected.items():
    np.testing.assert_allclose(np.asarray(flat[path]), value, atol=atol, rtol=rtol, err_msg=path)


def _task_vectors_np(base, finetuned):
  """{key: [tau_1, ..., tau_T]} in float64 for the float leaves."""
  b = _flat(base)
  flats = [_flat(f) for f in finetuned]
  return {k: [f[k] - v for f in flats] for k, v in b.items() if v.dtype.kind == "f"}


def _expected_tree(base, finetuned, merged_fn, scaling):
  """theta_0 + scaling * merged_fn(key, [tau_t]) for float leaves; integer leaves unchanged."""
  b = _flat(base)
  taus = _task_vectors_np(base, finetuned)
  return {k: b[k] + scaling * merged_fn(k, taus[k]) if k in taus else b[k] for k in b}


def _jit(fn, **kwargs):
  """jax.jit(fn) with `kwargs` bound, waiting for the result.

  Every JAX result here is waited for before numpy's LAPACK runs: with this venv's numpy
  (scipy-openblas 0.3.31, multi-threaded) an np.linalg.svd that overlaps an XLA CPU SVD still in
  flight deadlocks (OPENBLAS_NUM_THREADS=1 avoids it).
  """
  jitted = jax.jit(functools.partial(fn, **kwargs))
  return lambda *args: jax.block_until_ready(jitted(*args))


def _ready(fn):
  """fn, waiting for its result (see `_jit`)."""
  return lambda *args, **kwargs: jax.block_until_ready(fn(*args, **kwargs))


decompose = _ready(decomposition.decompose)
merges = {
  name: _ready(getattr(baselines, name))
  for name in ("task_arithmetic", "cart", "ties", "tsv_m", "iso_c", "iso_cts")
}


def _is_selected(key, patterns):
  return any(re.fullmatch(p, key) for p in patterns)


# ------------------------------------------------------------------------------------------------
# Independent numpy references (float64, from the papers' equations)


def _polar_np(a):
  """argmin_{Q: Q^T Q = I} ||Q - a||_F = P R^T for the SVD a = P S R^T."""
  p, _, rt = np.linalg.svd(a, full_matrices=False)
  return p @ rt


def _tsv_np(mats):
  """TSV-M, Gargiulo et al. Sec. 4: top floor(r/T) per task, whiten U and V, rebuild."""
  num = len(mats)
  m, n = mats[0].shape
  k = max(1, min(m, n) // num)
  us, ss, vs = [], [], []
  for mat in mats:
    u, s, vt = np.linalg.svd(mat)
    us.append(u[:, :k])
    ss.append(s[:k])
    vs.append(vt[:k].T)
  u_hat, v_hat = _polar_np(np.hstack(us)), _polar_np(np.hstack(vs))
  return u_hat @ np.diag(np.concatenate(ss)) @ v_hat.T


def _iso_c_np(mats):
  """Iso-C, Marczak et al. Sec. 4.1: sigma_bar U V^T of the summed task matrix."""
  u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
  return np.mean(s) * u @ vt


def _iso_cts_np(mats, fraction):
  """Iso-CTS, Marczak et al. Sec. 4.2 (official code's sizes), on (out, in) matrices Delta_t."""
  num = len(mats)
  r = min(mats[0].shape)
  k_c = int(r * fraction)
  s_t = int(np.round((r - k_c) / num))  # numpy rounds half to even, like Python's round
  k_c = r - num * s_t
  u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
  u_c = u[:, :k_c]
  cols_u, cols_v, values = [], [], []
  for mat in mats:
    residual = (np.eye(mat.shape[0]) - u_c @ u_c.T) @ mat
    ut, st, vtt = np.linalg.svd(residual, full_matrices=False)
    cols_u.append(ut[:, :s_t])
    cols_v.append(vtt[:s_t].T)
    values.append(st[:s_t])
  cols_u.append(u_c)
  cols_v.append(vt[:k_c].T)
  values.append(s[:k_c])
  sigma = np.mean(np.concatenate(values))
  return sigma * _polar_np(np.hstack(cols_u)) @ _polar_np(np.hstack(cols_v)).T


def _iso_cts_kernel_np(mats, fraction, side):
  """Kernels here are (in, out): the paper's Delta is the transpose for side='out'."""
  if side == "out":
    return _iso_cts_np([m.T for m in mats], fraction).T
  return _iso_cts_np(mats, fraction)


def _ties_np(base, finetuned, density, scaling, merge):
  """TIES (Yadav et al. 2023) with the original code's kthvalue trim and majority zero-sign rule."""
  b = {k: v for k, v in _flat(base).items() if v.dtype.kind == "f"}
  keys = sorted(b)
  base32 = {k: v.astype(np.float32) for k, v in b.items()}
  vectors = np.stack(
    [
      np.concatenate([(np.asarray(tree_util.flatten(f)[k], np.float32) - base32[k]).ravel() for k in keys])
      for f in finetuned
    ]
  ).astype(np.float64)
  n = vectors.shape[1]
  kth = n - int(n * density)
  trimmed = np.zeros_like(vectors)
  for t, vec in enumerate(vectors):
    threshold = np.sort(np.abs(vec))[kth - 1] if kth > 0 else 0.0
    trimmed[t] = np.where(np.abs(vec) >= threshold, vec, 0.0)
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  agree = np.where(sign > 0, trimmed > 0, trimmed < 0)  # the elected sign's entries, per task
  total = np.where(agree, trimmed, 0.0).sum(0)
  merged = total / np.maximum(agree.sum(0), 1) if merge == "mean" else total
  expected, offset = {}, 0
  for k in keys:
    size = b[k].size
    expected[k] = b[k] + scaling * merged[offset : offset + size].reshape(b[k].shape)
    offset += size
  for k, v in _flat(base).items():
    expected.setdefault(k, v)
  return expected


# ------------------------------------------------------------------------------------------------
# Zero-shot, weight averaging, task arithmetic, CART


def test_zero_shot_and_weight_average(models):
  base, finetuned = models
  assert baselines.zero_shot(base) is base
  flats = [_flat(f) for f in finetuned]
  expected = {k: sum(f[k] for f in flats) / T if v.dtype.kind == "f" else v for k, v in flats[0].items()}
  _assert_close(baselines.weight_average(finetuned), expected)


def test_task_arithmetic(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  expected = _expected_tree(base, finetuned, lambda _, mats: sum(mats), 0.3)
  _assert_close(merges["task_arithmetic"](origin, tau, scaling=0.3), expected)
  # The same merge from full-rank factors.
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  _assert_close(merges["task_arithmetic"](origin, factors, scaling=0.3), expected)


@pytest.mark.parametrize("rank_ratio", [0.3, 0.6])
def test_cart_matches_numpy(models, rank_ratio):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="average")
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  flats = [_flat(f) for f in finetuned]
  expected = {}
  for k, v in flats[0].items():
    if v.dtype.kind != "f":
      expected[k] = v
      continue
    avg = sum(f[k] for f in flats) / T
    total = np.zeros_like(avg)
    for f in flats:
      centred = f[k] - avg
      if k.endswith("kernel"):
        u, s, vt = np.linalg.svd(centred, full_matrices=False)
        keep = max(1, int(rank_ratio * min(centred.shape)))
        centred = (u[:, :keep] * s[:keep]) @ vt[:keep]
      total += centred
    expected[k] = avg + 2.0 * total
  _assert_close(merges["cart"](origin, factors, scaling=2.0, rank_ratio=rank_ratio), expected)


@pytest.mark.parametrize("scaling", [0.3, 2.0, -1.5])
def test_cart_at_full_rank_is_the_weight_average(models, scaling):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="average")
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  merged = merges["cart"](origin, factors, scaling=scaling, rank_ratio=1.0)
  _assert_close(merged, _flat(baselines.weight_average(finetuned)))


# ------------------------------------------------------------------------------------------------
# TIES


@pytest.mark.parametrize(
  "density, scaling, merge",
  [(0.2, None, "mean"), (0.5, 0.7, "mean"), (1.0, 1.0, "mean"), (0.2, None, "sum"), (0.35, 0.5, "sum")],
)
def test_ties_matches_numpy(models, density, scaling, merge):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  merged = merges["ties"](origin, tau, density=density, scaling=scaling, merge=merge)
  default = {"mean": 1.0, "sum": 0.3}[merge]
  expected = _ties_np(base, finetuned, density, default if scaling is None else scaling, merge)
  _assert_close(merged, expected)


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_on_a_clip_tower_matches_numpy(clip_models, merge):
  base, finetuned = clip_models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  merged = _jit(baselines.ties, density=0.2, merge=merge)(origin, tau)
  expected = _ties_np(base, finetuned, 0.2, {"mean": 1.0, "sum": 0.3}[merge], merge)
  _assert_close(merged, expected)


def test_ties_keeps_int_n_k_plus_one_entries():
  rng = np.random.default_rng(0)
  n = 997
  magnitudes = rng.permutation(np.arange(1, n + 1)).astype(np.float32)  # distinct |tau|
  signs = rng.choice([-1.0, 1.0], size=n).astype(np.float32)
  tau = {"w": (magnitudes * signs)[None].reshape(1, 997)}
  origin = {"w": np.zeros(n, np.float32)}
  for density in (0.2, 0.05, 0.5):
    merged = np.asarray(merges["ties"](origin, tau, density=density)["w"])
    assert np.count_nonzero(merged) == int(n * density) + 1
    kept = np.sort(np.abs(merged[merged != 0]))
    assert kept[0] == n - int(n * density)  # the (N - int(N k))-th smallest magnitude
  # Ties at the threshold are all kept (>=).
  tau = {"w": np.array([[1.0, 2.0, 2.0, 2.0, 3.0]], np.float32)}
  merged = merges["ties"]({"w": np.zeros(5, np.float32)}, tau, density=0.2)["w"]
  np.testing.assert_array_equal(merged, [0.0, 2.0, 2.0, 2.0, 3.0])


def test_ties_zero_sum_entries_take_the_majority_sign():
  origin = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
  # Entry a[0] sums to exactly 0; the elected signs of the other 3 entries (over all leaves) are +.
  tau = {
    "a": np.array([[1.0, 2.0], [-1.0, 2.0]], np.float32),
    "b": np.array([[3.0, 5.0], [3.0, -4.0]], np.float32),
  }
  merged = merges["ties"](origin, tau, density=1.0, merge="mean")
  np.testing.assert_array_equal(merged["a"], [1.0, 2.0])  # a[0]: the positive value, 1
  np.testing.assert_array_equal(merged["b"], [3.0, 5.0])
  merged = merges["ties"](origin, tau, density=1.0, merge="sum", scaling=1.0)
  np.testing.assert_array_equal(merged["a"], [1.0, 4.0])
  np.testing.assert_array_equal(merged["b"], [6.0, 5.0])
  # A negative majority: the zero-sum entry keeps the negative value.
  neg = {k: -v for k, v in tau.items()}
  merged = merges["ties"](origin, neg, density=1.0)
  np.testing.assert_array_equal(merged["a"], [-1.0, -2.0])
  np.testing.assert_array_equal(merged["b"], [-3.0, -5.0])
  # The default scaling follows the merge function: 0.3 for 'sum'.
  merged = merges["ties"](origin, tau, density=1.0, merge="sum")
  np.testing.assert_allclose(merged["a"], [0.3, 1.2], rtol=1e-6)


def test_ties_of_one_model_at_full_density_is_that_model(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned[:1], origin="pretrained")
  _assert_close(merges["ties"](origin, tau, density=1.0), _flat(finetuned[0]))


# ------------------------------------------------------------------------------------------------
# TSV-M


@pytest.mark.parametrize("scaling", [1.0, 0.6])
def test_tsv_m_matches_numpy(models, scaling):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  merged_fn = lambda k, mats: _tsv_np(mats) if k.endswith("kernel") else sum(mats) / T
  expected = _expected_tree(base, finetuned, merged_fn, scaling)
  _assert_close(merges["tsv_m"](origin, factors, scaling=scaling), expected)
  # FusionBench's rule: every 2-D tensor (here also 'proj') is a matrix, from dense task vectors.
  merged_fn = lambda _, mats: _tsv_np(mats) if mats[0].ndim == 2 else sum(mats) / T
  expected = _expected_tree(base, finetuned, merged_fn, scaling)
  _assert_close(merges["tsv_m"](origin, tau, scaling=scaling, matrices="all_2d"), expected)
  _assert_close(merges["tsv_m"](origin, factors, scaling=scaling, matrices="all_2d"), expected)


def test_tsv_m_on_a_clip_tower_matches_numpy(clip_models):
  base, finetuned = clip_models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, CLIP_SVD_KEYS))
  merged = _jit(baselines.tsv_m)(origin, factors)
  merged_fn = lambda k, mats: _tsv_np(mats) if _is_selected(k, CLIP_SVD_KEYS) else sum(mats) / T
  _assert_close(merged, _expected_tree(base, finetuned, merged_fn, 1.0), atol=2e-5)


def test_tsv_m_of_one_task_at_full_rank_is_that_task(models, clip_models):
  # T = 1: k = r and U, V already have orthonormal columns, so their polar factors are U and V:
  # TSV-M returns tau itself (not U V^T), and alpha = 1 gives back the fine-tuned model.
  for (base, finetuned), keys in ((models, SVD_KEYS), (clip_models, CLIP_SVD_KEYS)):
    origin, tau = task_vectors(base, finetuned[:1], origin="pretrained")
    factors = decompose(tau, tree_util.select(tau, keys))
    _assert_close(merges["tsv_m"](origin, factors), _flat(finetuned[0]), atol=2e-5)
  _assert_close(merges["tsv_m"](origin, tau, matrices="all_2d"), _flat(finetuned[0]), atol=2e-5)
  expected = _expected_tree(base, finetuned[:1], lambda _, mats: mats[0], 0.5)
  _assert_close(merges["tsv_m"](origin, factors, scaling=0.5), expected, atol=2e-5)


def test_tsv_rank():
  assert [baselines.tsv_rank(768, t) for t in (1, 8, 14, 20)] == [768, 96, 54, 38]
  assert baselines.tsv_rank(4, 8) == 1


# ------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS


@pytest.mark.parametrize("matrices", ["decomposed", "all_2d"])
def test_iso_c_matches_numpy(models, matrices):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  if matrices == "decomposed":
    merged_fn = lambda k, mats: _iso_c_np(mats) if k.endswith("kernel") else sum(mats) / T
  else:
    merged_fn = lambda _, mats: _iso_c_np(mats) if mats[0].ndim == 2 else sum(mats) / T
  expected = _expected_tree(base, finetuned, merged_fn, 1.3)
  _assert_close(merges["iso_c"](origin, factors, scaling=1.3, matrices=matrices), expected)
  if matrices == "all_2d":
    _assert_close(merges["iso_c"](origin, tau, scaling=1.3, matrices=matrices), expected)
  # The default alpha is 1.5.
  expected = _expected_tree(base, finetuned, merged_fn, 1.5)
  _assert_close(merges["iso_c"](origin, factors, matrices=matrices), expected)


def test_iso_c_of_an_isotropic_sum_is_that_sum():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(7, 5)))  # orthonormal columns: equal singular values
  total = (2.5 * q).astype(np.float32)
  part = rng.normal(size=(7, 5)).astype(np.float32)
  tau = {"w": np.stack([total - part, part]), "b": np.ones((2, 5), np.float32)}
  origin = {"w": np.zeros((7, 5), np.float32), "b": np.zeros(5, np.float32)}
  merged = merges["iso_c"](origin, tau, scaling=1.0, matrices="all_2d")
  np.testing.assert_allclose(merged["w"], total, atol=1e-5)
  np.testing.assert_allclose(merged["b"], np.ones(5), atol=1e-6)  # the mean of the task vectors


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
@pytest.mark.parametrize("side", ["out", "in"])
def test_iso_cts_matches_numpy(models, fraction, side):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  merged_fn = lambda k, mats: (
    _iso_cts_kernel_np(mats, fraction, side) if k.endswith("kernel") else sum(mats) / T
  )
  expected = _expected_tree(base, finetuned, merged_fn, 1.2)
  merged = merges["iso_cts"](origin, factors, scaling=1.2, common_fraction=fraction, side=side)
  _assert_close(merged, expected)
  # The official code's rule on dense task vectors: every 2-D tensor ('proj' too).
  merged_fn = lambda _, mats: _iso_cts_kernel_np(mats, fraction, side) if mats[0].ndim == 2 else sum(mats) / T
  expected = _expected_tree(base, finetuned, merged_fn, 1.2)
  merged = merges["iso_cts"](origin, tau, scaling=1.2, common_fraction=fraction, side=side, matrices="all_2d")
  _assert_close(merged, expected)


def test_iso_cts_on_a_clip_tower_matches_numpy(clip_models):
  base, finetuned = clip_models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, CLIP_SVD_KEYS))
  merged = _jit(baselines.iso_cts)(origin, factors)
  merged_fn = lambda k, mats: (
    _iso_cts_kernel_np(mats, 0.8, "out") if _is_selected(k, CLIP_SVD_KEYS) else sum(mats) / T
  )
  _assert_close(merged, _expected_tree(base, finetuned, merged_fn, 1.5), atol=2e-5)
  # Iso-C on the same tree.
  merged = merges["iso_c"](origin, factors)
  merged_fn = lambda k, mats: _iso_c_np(mats) if _is_selected(k, CLIP_SVD_KEYS) else sum(mats) / T
  _assert_close(merged, _expected_tree(base, finetuned, merged_fn, 1.5), atol=2e-5)


def test_iso_cts_side_matters(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  out = merges["iso_cts"](origin, tau, matrices="all_2d", common_fraction=0.5, side="out")
  inp = merges["iso_cts"](origin, tau, matrices="all_2d", common_fraction=0.5, side="in")
  assert not np.allclose(out["enc"][0]["kernel"], inp["enc"][0]["kernel"], atol=1e-3)


@pytest.mark.parametrize("side", ["out", "in"])
def test_iso_cts_with_all_common_directions_is_iso_c(models, clip_models, side):
  for (base, finetuned), keys in ((models, SVD_KEYS), (clip_models, CLIP_SVD_KEYS)):
    origin, tau = task_vectors(base, finetuned, origin="pretrained")
    factors = decompose(tau, tree_util.select(tau, keys))
    iso_c = merges["iso_c"](origin, factors, scaling=1.1)
    iso_cts = merges["iso_cts"](origin, factors, scaling=1.1, common_fraction=1.0, side=side)
    _assert_close(iso_cts, _flat(iso_c), atol=2e-5)


def test_iso_cts_split():
  # ViT-B/32 with 8 tasks: int(0.8 * 768) = 614, round(154 / 8) = 19, so k_c = 768 - 152 = 616.
  assert baselines.iso_cts_split(768, 8, 0.8) == (616, 19)
  assert baselines.iso_cts_split(768, 14, 0.8) == (614, 11)
  assert baselines.iso_cts_split(1024, 20, 0.8) == (824, 10)
  assert baselines.iso_cts_split(32, 3, 0.8) == (26, 2)
  assert baselines.iso_cts_split(10, 4, 0.0) == (2, 2)  # round(2.5) = 2 (half to even)
  assert baselines.iso_cts_split(64, 8, 1.0) == (64, 0)
  with pytest.raises(ValueError, match="common directions"):
    baselines.iso_cts_split(10, 6, 0.0)  # round(10 / 6) * 6 = 12 > 10


# ------------------------------------------------------------------------------------------------
# Errors


def test_errors(models):
  base, finetuned = models
  origin, tau = task_vectors(base, finetuned, origin="pretrained")
  factors = decompose(tau, tree_util.select(tau, SVD_KEYS))
  with pytest.raises(ValueError, match="ties: expects dense.*'enc/0/kernel'"):
    merges["ties"](origin, factors)
  with pytest.raises(ValueError, match="density"):
    merges["ties"](origin, tau, density=0.0)
  with pytest.raises(ValueError, match="merge='max'"):
    merges["ties"](origin, tau, merge="max")
  with pytest.raises(ValueError, match="rank_ratio"):
    merges["cart"](origin, factors, scaling=1.0, rank_ratio=0.0)
  with pytest.raises(ValueError, match="origin lacks.*extra"):
    merges["task_arithmetic"](origin, dict(tau, extra=np.zeros((T, 2))), scaling=0.3)
  with pytest.raises(ValueError, match="matrices="):
    merges["tsv_m"](origin, factors, matrices="2d")
  with pytest.raises(ValueError, match="matrices="):
    merges["iso_c"](origin, factors, matrices="2d")
  with pytest.raises(ValueError, match="side="):
    merges["iso_cts"](origin, factors, side="rows")
  with pytest.raises(ValueError, match="common_fraction"):
    merges["iso_cts"](origin, factors, common_fraction=1.5)
  truncated = decompose(tau, tree_util.select(tau, SVD_KEYS), rank=1)
  origin2, tau2 = task_vectors(base, finetuned[:2], origin="pretrained")
  with pytest.raises(ValueError, match="tsv_m: the factors hold 1 components.*k = max"):
    merges["tsv_m"](origin2, decompose(tau2, tree_util.select(tau2, SVD_KEYS), rank=1))
  assert merges["tsv_m"](origin, truncated)  # T = 3, r = 4: k = 1 is enough
