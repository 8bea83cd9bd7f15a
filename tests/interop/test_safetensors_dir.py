"""Sharded safetensors decoder directories: read leaf by leaf, written back, parity with transformers 5.23."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from adarank_jax.core import tree_util
from adarank_jax.interop import safetensors_dir, state_dict
from adarank_jax.models import decoder, functional

_TINY = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  pad_token_id=0,
)
_MODELS = {
  "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
  "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}
SHARD = "40KB"  # the tiny models are ~280 KB: about 10 shards


def hf_model(case="llama", seed=0, **fields):
  config_class, model_class, defaults = _MODELS[case]
  torch.manual_seed(seed)
  return model_class(config_class(**{**_TINY, **defaults, **fields})).eval()


def save(model, directory, max_shard_size=SHARD):
  model.save_pretrained(directory, max_shard_size=max_shard_size)
  return directory


def _ids():
  ids = np.random.default_rng(0).integers(1, 128, (2, 9))
  ids[1, 6:] = 0  # right padding
  return ids, (ids != 0).astype(np.int64)


def logits(config, tree, ids, mask):
  graphdef, _ = functional.split(nnx.eval_shape(lambda: decoder.build(config, rngs=nnx.Rngs(0))))
  fn = jax.jit(functools.partial(functional.call, graphdef))
  return np.asarray(fn(tree, jnp.asarray(ids), jnp.asarray(mask)))


def reference(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def rel_err(ours, ref, mask):
  ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]  # padded positions mean nothing in either
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", list(_MODELS))
def test_sharded_directory_reads_and_exports_with_transformers_logits(tmp_path, case):
  model = hf_model(case)
  directory = save(model, tmp_path / "hf")
  assert len(list(directory.glob("model-*-of-*.safetensors"))) > 2
  ids, mask = _ids()
  ref = reference(model, ids, mask)

  opened = safetensors_dir.open_dir(directory)
  assert len(set(opened.files.values())) > 2
  config, tree = safetensors_dir.load(directory)
  assert ("lm_head" in tree) != config.tie_word_embeddings
  read_err = rel_err(logits(config, tree, ids, mask), ref, mask)
  assert read_err <= 1e-5, read_err

  names = safetensors_dir.save_sharded(tree, opened.hf_config, tmp_path / "out", max_shard_size=SHARD)
  assert len(names) > 2 and sorted(names) == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
  index = json.loads((tmp_path / "out" / safetensors_dir.INDEX).read_text())
  assert set(index["weight_map"].values()) == set(names)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(reloaded) is type(model)
  export_err = rel_err(reference(reloaded, ids, mask), ref, mask)
  assert export_err <= 1e-5, export_err
  # the weights round-trip exactly, and a single-file directory reads the same
  _, again = safetensors_dir.load(tmp_path / "out")
  save(reloaded, tmp_path / "single", max_shard_size="10MB")
  assert (tmp_path / "single" / safetensors_dir.WEIGHTS).is_file()
  _, single = safetensors_dir.load(tmp_path / "single")
  for path, value in tree_util.flatten(tree).items():
    np.testing.assert_array_equal(tree_util.flatten(again)[path], value, err_msg=path)
    np.testing.assert_array_equal(tree_util.flatten(single)[path], value, err_msg=path)


def test_export_of_one_shard_has_no_index_and_sizes_parse(tmp_path):
  directory = save(hf_model(), tmp_path / "hf")
  opened = safetensors_dir.open_dir(directory)
  assert safetensors_dir.save_sharded(opened.read_tree(), opened.hf_config, tmp_path / "out") == [
    "model.safetensors"
  ]
  assert not (tmp_path / "out" / safetensors_dir.INDEX).exists()
  assert safetensors_dir.parse_size("40KB") == 40_000 and safetensors_dir.parse_size("2GiB") == 2 * 2**30
  with pytest.raises(ValueError, match="max_shard_size"):
    safetensors_dir.parse_size("lots")


def test_export_checks_the_tree_before_writing(tmp_path):
  opened = safetensors_dir.open_dir(save(hf_model(), tmp_path / "hf"))
  flat = tree_util.flatten(opened.read_tree())
  flat["model/norm/scale"] = np.full_like(flat["model/norm/scale"], np.nan)
  with pytest.raises(tree_util.NonFiniteError, match="model/norm/scale"):
    safetensors_dir.save_sharded(tree_util.unflatten(flat), opened.hf_config, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def _index(directory):
  return json.loads((directory / safetensors_dir.INDEX).read_text())


def test_missing_shard_file_is_named(tmp_path):
  directory = save(hf_model(), tmp_path / "hf")
  shard = _index(directory)["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  (directory / shard).unlink()
  with pytest.raises(state_dict.CheckpointError, match=rf"{safetensors_dir.INDEX}: shard files .*{shard}"):
    safetensors_dir.open_dir(directory)


def test_index_key_in_a_shard_that_lacks_it_is_named(tmp_path):
  directory = save(hf_model(), tmp_path / "hf")
  index = _index(directory)
  key = "model.layers.0.self_attn.q_proj.weight"
  other = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][key])
  index["weight_map"][key] = other
  (directory / safetensors_dir.INDEX).write_text(json.dumps(index))
  with pytest.raises(tree_util.StructureError, match=rf"{other} lacks {key}"):
    safetensors_dir.open_dir(directory)


def test_shape_mismatch_with_the_config_names_file_key_and_expected_shape(tmp_path):
  directory = save(hf_model(), tmp_path / "hf")
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
  shard = _index(directory)["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(tree_util.StructureError) as error:
    safetensors_dir.open_dir(directory)
  message = str(error.value)
  assert (
    f"{directory / shard}: model.layers.1.mlp.up_proj.weight: shape (96, 64), expected (80, 64)" in message
  )
  assert "shape mismatches (6)" in message and "config.json" in message  # gate/up/down of 2 layers


def test_missing_and_integer_tensors_are_named(tmp_path):
  directory = save(hf_model(), tmp_path / "hf")
  weight_map = _index(directory)["weight_map"]
  shard = directory / weight_map["model.norm.weight"]
  tensors = safetensors.numpy.load_file(shard)
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
  safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
  index = _index(directory)
  del index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
  (directory / safetensors_dir.INDEX).write_text(json.dumps(index))
  with pytest.raises(tree_util.StructureError) as error:
    safetensors_dir.open_dir(directory)
  assert "missing keys (1), in no file of the directory: model.layers.0.mlp.down_proj.weight" in str(
    error.value
  )
  assert f"{shard}: model.norm.weight: dtype I32, expected a floating-point dtype" in str(error.value)


def test_nan_and_inf_are_named_with_their_file(tmp_path):
  directory = save(hf_model(), tmp_path / "hf")
  weight_map = _index(directory)["weight_map"]
  bad = ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.post_attention_layernorm.weight")
  for key, value in zip(bad, (np.nan, np.inf)):
    shard = directory / weight_map[key]
    tensors = safetensors.numpy.load_file(shard)
    tensors[key][0] = value
    safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
  opened = safetensors_dir.open_dir(directory)  # headers are fine
  with pytest.raises(tree_util.NonFiniteError) as error:
    safetensors_dir.check_finite(opened)
  for key in bad:
    assert f"{directory / weight_map[key]}: {key}" in str(error.value)
  with pytest.raises(tree_util.NonFiniteError, match=rf"{weight_map[bad[0]]}: {bad[0]}: NaN or Inf"):
    safetensors_dir.load(directory)


@pytest.mark.parametrize(
  "other, field",
  [
    (dict(hidden_size=32, intermediate_size=48), "hidden_size=32"),
    (dict(case="qwen2-tied"), "model_type='qwen2'"),
  ],
)
def test_architecture_mismatch_names_both_configs_and_the_field(tmp_path, other, field):
  base = safetensors_dir.open_dir(save(hf_model(), tmp_path / "base"))
  tuned = safetensors_dir.open_dir(save(hf_model(**other), tmp_path / "tuned"))
  with pytest.raises(tree_util.StructureError) as error:
    safetensors_dir.check_same_architecture(base, tuned)
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'tuned' / 'config.json'}: architecture differs from ")
  assert str(tmp_path / "base" / "config.json") in message and field in message


def test_not_a_decoder_or_no_weights(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(state_dict.CheckpointError, match="no config.json"):
    safetensors_dir.open_dir(tmp_path / "empty")
  directory = save(hf_model(), tmp_path / "hf")
  for file in directory.glob("*.safetensors*"):
    file.unlink()
  with pytest.raises(state_dict.CheckpointError, match="no weights"):
    safetensors_dir.open_dir(directory)
