"""Llama, Mistral and Qwen2 parity with transformers 5.23 (random-init tiny models from configs)."""

import dataclasses
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
from adarank_jax.interop import hf, hf_config, state_dict
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
  num_labels=3,
)
_CONFIGS = {
  "llama": transformers.LlamaConfig,
  "mistral": transformers.MistralConfig,
  "qwen2": transformers.Qwen2Config,
}
_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_LLAMA3 = dict(
  rope_theta=500000.0,
  rope_scaling=dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
  ),
)


def _ids():
  """(3, 10) ids with pad 0: row 0 unpadded, row 1 padded on the right, row 2 on the left."""
  ids = np.random.default_rng(0).integers(1, 128, (3, 10))
  ids[1, 6:] = 0
  ids[2, :3] = 0
  return ids, (ids != 0).astype(np.int64)


def _hf_model(model_type, head, seed=0, **fields):
  torch.manual_seed(seed)
  config = _CONFIGS[model_type](**{**_TINY, **fields})
  return getattr(transformers, _PREFIX[model_type] + head)(config).eval()


def _apply(config, tree, ids, mask, method="__call__"):
  graphdef, _ = functional.split(nnx.eval_shape(lambda: decoder.build(config, rngs=nnx.Rngs(0))))
  fn = jax.jit(functools.partial(functional.call, graphdef, method=method))
  return np.asarray(fn(tree, jnp.asarray(ids), jnp.asarray(mask)))


def _reference(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  return (
    out.last_hidden_state
    if isinstance(out, transformers.modeling_outputs.BaseModelOutputWithPast)
    else out.logits
  ).numpy()


def _parse(model):
  """Our config of an HF model, as `hf.load_hf` parses its saved config.json."""
  return hf_config.model_config({**model.config.to_dict(), "architectures": [type(model).__name__]})


def _rel_err(ours, ref):
  return np.abs(ours - ref).max() / np.abs(ref).max()


def _load(model, tmp_path):
  model.save_pretrained(tmp_path / "m")
  return hf.load_hf(tmp_path / "m")


CASES = {
  "llama-lm": ("llama", "ForCausalLM", {}),
  "llama-cls": ("llama", "ForSequenceClassification", {}),
  "llama3-rope-biases-head_dim-tied-lm": (
    "llama",
    "ForCausalLM",
    dict(_LLAMA3, attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=True),
  ),
  "mistral-window-lm": ("mistral", "ForCausalLM", dict(sliding_window=4)),
  "mistral-cls": ("mistral", "ForSequenceClassification", dict(sliding_window=None)),
  "qwen2-tied-lm": ("qwen2", "ForCausalLM", dict(tie_word_embeddings=True)),
  "qwen2-window-cls": (
    "qwen2",
    "ForSequenceClassification",
    dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
  ),
  "qwen2-bare": ("qwen2", "Model", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_on_padded_batches(tmp_path, case):
  model_type, head, fields = CASES[case]
  model = _hf_model(model_type, head, **fields)
  ids, mask = _ids()
  ref = _reference(model, ids, mask)
  config, tree = _load(model, tmp_path)
  assert config.architecture == _PREFIX[model_type] + head and config.model_type == model_type
  ours = _apply(config, tree, ids, mask)
  assert ours.shape == ref.shape
  if head == "ForSequenceClassification":
    assert ours.shape == (3, 3)
  else:  # per-token outputs: padded positions are meaningless in both
    ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
  assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), _rel_err(ours, ref)
  # the key map is exact both ways: the tree gives back the very tensors transformers saved
  saved = safetensors.numpy.load_file(tmp_path / "m" / "model.safetensors")
  exported = hf.state_dict_from_tree(config, tree)
  assert exported.keys() == saved.keys()
  for key, value in saved.items():
    assert exported[key].dtype == value.dtype and exported[key].tobytes() == value.tobytes(), key


def test_parsed_configs_carry_the_variant_fields(tmp_path):
  llama = _parse(_hf_model("llama", "ForCausalLM", **CASES["llama3-rope-biases-head_dim-tied-lm"][2]))
  assert llama.rope_parameters == decoder.RopeParameters("llama3", 500000.0, 8.0, 1.0, 4.0, 16)
  assert (llama.head_dim, llama.qkv_bias, llama.attention_bias, llama.mlp_bias) == (24, True, True, True)
  assert llama.tie_word_embeddings and llama.num_labels is None
  mistral = _parse(_hf_model("mistral", "ForCausalLM", sliding_window=4))
  assert mistral.sliding_window == 4 and mistral.layer_types == ("sliding_attention",) * 2
  assert not mistral.qkv_bias and mistral.head_dim == 16
  qwen = _parse(_hf_model("qwen2", "ForSequenceClassification", **CASES["qwen2-window-cls"][2]))
  assert qwen.layer_types == ("full_attention", "sliding_attention") and qwen.qkv_bias
  assert not qwen.attention_bias and qwen.num_labels == 3
  assert _parse(_hf_model("qwen2", "ForCausalLM", sliding_window=3)).layer_types == ("full_attention",) * 2


def test_llama3_inverse_frequencies_equal_transformers():
  model = _hf_model("llama", "Model", **_LLAMA3)
  config = _parse(model)
  ours = decoder.rope_inv_freq(config.rope_parameters, config.head_dim)
  np.testing.assert_allclose(ours, model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  default = decoder.rope_inv_freq(decoder.RopeParameters("default", 500000.0), config.head_dim)
  # 2 pi < 16: interpolated; the longest wavelengths (> original_max_position_embeddings): divided by factor
  assert default[0] / 8 < ours[0] < default[0] and ours[-1] == pytest.approx(default[-1] / 8, rel=1e-6)


def test_sliding_window_changes_the_outputs(tmp_path):
  """Tokens further back than sliding_window are invisible: the same weights without a window differ."""
  model = _hf_model("mistral", "ForCausalLM", sliding_window=4)
  ids, mask = np.random.default_rng(1).integers(1, 128, (1, 12)), np.ones((1, 12), np.int64)
  config, tree = _load(model, tmp_path)
  windowed = _apply(config, tree, ids, mask)
  full = _apply(dataclasses.replace(config, layer_types=("full_attention",) * 2), tree, ids, mask)
  np.testing.assert_array_equal(windowed[:, :4], full[:, :4])  # the first 4 tokens see the same keys
  assert np.abs(windowed[:, 4:] - full[:, 4:]).max() > 1e-3
  assert _rel_err(windowed, _reference(model, ids, mask)) <= 1e-5


def test_bfloat16_is_finite_and_close(tmp_path):
  model = _hf_model("llama", "ForSequenceClassification")
  ids, mask = _ids()
  ref = _reference(model, ids, mask)
  config, tree = _load(model, tmp_path)
  bf16 = _apply(dataclasses.replace(config, dtype="bfloat16"), tree, ids, mask)
  assert bf16.dtype == jnp.bfloat16 and np.isfinite(bf16.astype(np.float32)).all()
  assert _rel_err(bf16.astype(np.float32), ref) < 0.05


def test_save_hf_reloads_in_transformers(tmp_path):
  model = _hf_model("qwen2", "ForCausalLM", tie_word_embeddings=True)
  config, tree = _load(model, tmp_path)
  assert "lm_head" not in tree
  hf.save_hf(tree, json.loads((tmp_path / "m" / "config.json").read_text()), tmp_path / "out")
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids, mask = _ids()
  np.testing.assert_array_equal(_reference(reloaded, ids, mask), _reference(model, ids, mask))
  _, again = hf.load_hf(tmp_path / "out")
  for path, value in tree_util.flatten(tree).items():
    np.testing.assert_array_equal(tree_util.flatten(again)[path], value, err_msg=path)


def test_old_rotary_buffers_are_skipped_and_missing_keys_named(tmp_path):
  model = _hf_model("llama", "ForSequenceClassification")
  model.save_pretrained(tmp_path / "m")
  config_dict, state = state_dict.load_hf_directory(tmp_path / "m")
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # Llama 2 era checkpoints
  state_dict.save_hf_directory(config_dict, state, tmp_path / "old")
  hf.load_hf(tmp_path / "old")
  del state["model.layers.1.mlp.up_proj.weight"]
  state_dict.save_hf_directory(config_dict, state, tmp_path / "bad")
  with pytest.raises(tree_util.StructureError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf(tmp_path / "bad")


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_type 'yarn'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_act="gelu_fast"), "hidden_act 'gelu_fast'"),
  ],
)
def test_unsupported_configs_are_errors_naming_the_field(fields, match):
  config = _CONFIGS["llama"](**{**_TINY, **fields}).to_dict()
  config["architectures"] = ["LlamaForCausalLM"]
  with pytest.raises(ValueError, match=match):
    hf_config.model_config(config, source="x/config.json")


def test_config_checks_the_variant():
  config = hf_config.model_config({**_CONFIGS["qwen2"](**_TINY).to_dict(), "architectures": ["Qwen2Model"]})
  with pytest.raises(ValueError, match="not one of"):
    dataclasses.replace(config, architecture="LlamaModel")
  with pytest.raises(ValueError, match="Llama fields"):
    dataclasses.replace(config, attention_bias=True)
  with pytest.raises(ValueError, match="sliding_window"):
    dataclasses.replace(config, layer_types=("full_attention", "sliding_attention"))
  with pytest.raises(ValueError, match="num_key_value_heads 3"):
    dataclasses.replace(config, num_key_value_heads=3)
