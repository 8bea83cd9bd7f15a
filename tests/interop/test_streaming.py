"""Streaming decomposition from sharded decoder directories equals the in-memory task_vectors + decompose."""

import copy
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from adarank_jax.core import decomposition, task_vectors, tree_util
from adarank_jax.core.decomposition import SVD
from adarank_jax.interop import safetensors_dir, state_dict, streaming

TASKS = 3
_TINY = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
)
_MODELS = {
  "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
  "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


def hf_model(case="llama", **fields):
  config_class, model_class, defaults = _MODELS[case]
  torch.manual_seed(0)
  return model_class(config_class(**{**_TINY, **defaults, **fields})).eval()


def save(model, directory):
  model.save_pretrained(directory, max_shard_size="40KB")  # ~10 shards
  return directory


def _directories(tmp_path, case="llama"):
  """A sharded pretrained directory and TASKS fine-tuned ones (every weight moved by noise of its own)."""
  model = hf_model(case)
  base = save(model, tmp_path / "base")
  tuned = []
  for t in range(TASKS):
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(100 + t)
    with torch.no_grad():
      for param in copy_.parameters():
        param.add_(1e-2 * torch.randn(param.shape, generator=generator))
    tuned.append(save(copy_, tmp_path / f"task{t}"))
  return base, tuned


def _in_memory(base, tuned, *, origin, unmerged=(), rank=None, dtype=None):
  pretrained = safetensors_dir.load(base)[1]
  finetuned = [safetensors_dir.load(d)[1] for d in tuned]
  include = jax.tree.map(lambda x: not x, tree_util.select(pretrained, unmerged))
  origin_tree, tau = task_vectors.task_vectors(pretrained, finetuned, origin=origin, include=include)
  select = tree_util.select(tau, streaming.DECODER_DECOMPOSE)
  return origin_tree, decomposition.decompose(tau, select, rank=rank, dtype=dtype)


CASES = {
  "llama-ta": ("llama", dict(origin="pretrained")),
  "qwen2-tied-cart-unmerged-embeddings-rank-bf16": (
    "qwen2-tied",
    dict(origin="average", unmerged=(r"model/embed_tokens/.*",), rank=5, dtype=jax.numpy.bfloat16),
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, case):
  family, options = CASES[case]
  base, tuned = _directories(tmp_path, family)
  want_origin, want = _in_memory(base, tuned, **options)
  got_origin, got = streaming.decompose_directories(base, tuned, **options)

  assert list(tree_util.flatten(got_origin)) == list(tree_util.flatten(want_origin))
  for path, value in tree_util.flatten(want_origin).items():
    np.testing.assert_array_equal(np.asarray(tree_util.flatten(got_origin)[path]), np.asarray(value), path)
  got_flat, want_flat = tree_util.flatten(got), tree_util.flatten(want)
  assert list(got_flat) == list(want_flat)  # the same leaves, in the same order
  assert sum(map(decomposition.is_svd, want_flat.values())) == 7 * 2  # q/k/v/o, gate/up/down of 2 layers
  for path, value in want_flat.items():
    assert decomposition.is_svd(got_flat[path]) == decomposition.is_svd(value), path
    for ours, theirs in zip(*(x if decomposition.is_svd(x) else (x,) for x in (got_flat[path], value))):
      assert isinstance(ours, jax.Array) and ours.shape == theirs.shape and ours.dtype == theirs.dtype, path
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), path)
  if "unmerged" in options:
    assert "embed_tokens" not in got["model"]
  else:
    assert got_flat["model/embed_tokens/embedding"].shape == (TASKS, 128, 64)  # dense task vectors


def test_one_worker_and_batched_flushes_give_the_same_factors(tmp_path, monkeypatch):
  base, tuned = _directories(tmp_path)
  _, wide = streaming.decompose_directories(base, tuned, workers=8)  # several leaves per decompose call
  monkeypatch.setattr(streaming, "BATCH_BYTES", 1)
  _, narrow = streaming.decompose_directories(base, tuned, workers=1)  # one leaf per call
  for path, value in tree_util.flatten(wide).items():
    for ours, theirs in zip(tree_util.flatten(narrow)[path], value) if decomposition.is_svd(value) else []:
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), path)


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if anything is decomposed or subtracted."""

  def refuse(*args, **kwargs):
    raise AssertionError("computed before the inputs were checked")

  monkeypatch.setattr(streaming.decomposition, "decompose", refuse)
  monkeypatch.setattr(streaming, "_deltas", refuse)
  monkeypatch.setattr(streaming, "_average", refuse)


def test_nan_in_the_last_tensor_of_a_finetuned_directory_fails_before_any_compute(tmp_path, no_compute):
  base, tuned = _directories(tmp_path)
  weight_map = json.loads((tuned[-1] / safetensors_dir.INDEX).read_text())["weight_map"]
  key = "lm_head.weight"
  shard = tuned[-1] / weight_map[key]
  tensors = safetensors.numpy.load_file(shard)
  tensors[key][-1, -1] = np.inf
  safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
  with pytest.raises(tree_util.NonFiniteError, match=rf"{shard}: {key}"):
    streaming.decompose_directories(base, tuned)


def test_bad_directories_fail_before_any_compute(tmp_path, no_compute):
  base, tuned = _directories(tmp_path)
  other = save(hf_model(hidden_size=32, intermediate_size=48), tmp_path / "other")
  with pytest.raises(
    tree_util.StructureError, match=r"other/config.json: architecture differs .*hidden_size=32"
  ):
    streaming.decompose_directories(base, [*tuned, other])
  shard = json.loads((tuned[1] / safetensors_dir.INDEX).read_text())["weight_map"]["model.norm.weight"]
  (tuned[1] / shard).unlink()
  with pytest.raises(
    state_dict.CheckpointError, match=rf"task1/{safetensors_dir.INDEX}: shard files .*{shard}"
  ):
    streaming.decompose_directories(base, tuned)
  with pytest.raises(ValueError, match="selects no matrix"):
    streaming.decompose_directories(base, tuned[:1], decompose=(r"nothing/.*",))
  with pytest.raises(ValueError, match="not matrices"):
    streaming.decompose_directories(base, tuned[:1], decompose=(r"model/norm/scale",))


def test_factors_reconstruct_the_task_vectors(tmp_path):
  base, tuned = _directories(tmp_path)
  origin, factors = streaming.decompose_directories(base, tuned, method="host")
  kernel = "model/layers/1/mlp/down_proj/kernel"
  svd = tree_util.flatten(factors)[kernel]
  assert isinstance(svd, SVD) and svd.u.shape == (TASKS, 96, 64) and svd.vt.shape == (TASKS, 64, 64)
  tau = (
    np.stack([safetensors_dir.open_dir(d).read(kernel) for d in tuned]) - tree_util.flatten(origin)[kernel]
  )
  np.testing.assert_allclose(np.asarray(decomposition.reconstruct(svd)), tau, atol=1e-6)
