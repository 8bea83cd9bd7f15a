"""GPT-2 parity with transformers 5.23 (random-init models from configs)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from adarank_jax.interop import hf, state_dict
from adarank_jax.models import functional, gpt2, pooling


def _apply(config, tree, *args, method="__call__"):
  graphdef, _ = functional.split(nnx.eval_shape(lambda: gpt2.build(config, rngs=nnx.Rngs(0))))
  fn = jax.jit(functools.partial(functional.call, graphdef, method=method))
  return np.asarray(fn(tree, *map(jnp.asarray, args)))


def _rel_err(ours, ref):
  return np.abs(ours - ref).max() / np.abs(ref).max()


def test_gpt2_sized_classifier_matches_transformers(tmp_path):
  torch.manual_seed(0)
  config = transformers.GPT2Config(pad_token_id=50256, num_labels=2)  # gpt2 (124M) sized
  model = transformers.GPT2ForSequenceClassification(config).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50256, (3, 24))
  ids[1, 15:] = 50256  # padded to the right
  ids[2, 6:] = 50256
  mask = (ids != 50256).astype(np.int64)  # row 0 has no padding
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
    )
  model.save_pretrained(tmp_path / "gpt2")
  ours_config, tree = hf.load_hf(tmp_path / "gpt2")
  assert tree["transformer"]["h"][11]["attn"]["c_attn"]["kernel"].shape == (768, 2304)
  assert tree["score"]["kernel"].shape == (768, 2) and "bias" not in tree["score"]
  logits = _apply(ours_config, tree, ids, mask)
  assert logits.shape == (3, 2)
  assert _rel_err(logits, out.logits.numpy()) <= 1e-4
  hidden = _apply(ours_config, tree, ids, mask, method="encode")
  valid = mask.astype(bool)
  assert _rel_err(hidden[valid], out.hidden_states[-1].numpy()[valid]) <= 1e-4


def test_last_non_pad_index_follows_transformers():
  ids = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [0, 0, 4, 5, 0]])
  np.testing.assert_array_equal(np.asarray(pooling.last_non_pad_index(ids, 0)), [2, 4, 0, 3])
  np.testing.assert_array_equal(np.asarray(pooling.last_non_pad_index(ids[:1], None)), [4])
  with pytest.raises(ValueError, match="batch sizes > 1"):
    pooling.last_non_pad_index(ids, None)


def _tiny(**kwargs):
  return transformers.GPT2Config(vocab_size=90, n_positions=24, n_embd=32, n_layer=2, n_head=4, **kwargs)


def test_left_padding_and_layer_scaling_match_transformers(tmp_path):
  torch.manual_seed(1)
  config = _tiny(
    pad_token_id=0, num_labels=3, scale_attn_by_inverse_layer_idx=True, activation_function="gelu"
  )
  model = transformers.GPT2ForSequenceClassification(config).eval()
  ids = np.array([[0, 0, 0, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3, 4, 0, 0, 0, 0, 0]])
  mask = (ids != 0).astype(np.int64)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  model.save_pretrained(tmp_path / "gpt2")
  ours_config, tree = hf.load_hf(tmp_path / "gpt2")
  assert ours_config.scale_attn_by_inverse_layer_idx
  assert _rel_err(_apply(ours_config, tree, ids, mask), ref.numpy()) <= 1e-4


def test_lm_head_model_from_hub_style_keys(tmp_path):
  """GPT2LMHeadModel on the hub stores 'h.0...' keys (no 'transformer.') plus buffers."""
  torch.manual_seed(2)
  model = transformers.GPT2LMHeadModel(_tiny()).eval()
  model.save_pretrained(tmp_path / "lm")
  config_dict, state = state_dict.load_hf_directory(tmp_path / "lm")
  hub_state = {k.removeprefix("transformer."): v for k, v in state.items()}
  hub_state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))  # old buffers
  hub_state["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
  state_dict.save_hf_directory(config_dict, hub_state, tmp_path / "hub")
  ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  ours_config, tree = hf.load_hf(tmp_path / "hub")
  assert set(tree) == {"transformer"}
  assert _rel_err(_apply(ours_config, tree, ids, mask), ref.numpy()) <= 1e-4


def test_bare_gpt2_model_and_bfloat16(tmp_path):
  torch.manual_seed(3)
  model = transformers.GPT2Model(_tiny()).eval()
  model.save_pretrained(tmp_path / "bare")
  ids = np.array([[5, 6, 7, 8, 9]])
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
  ours_config, tree = hf.load_hf(tmp_path / "bare")
  assert set(tree) == {"wte", "wpe", "h", "ln_f"}
  assert _rel_err(_apply(ours_config, tree, ids, mask), ref) <= 1e-4
  bf16 = _apply(dataclasses.replace(ours_config, dtype="bfloat16"), tree, ids, mask)
  assert bf16.dtype == jnp.bfloat16
  assert _rel_err(bf16.astype(np.float32), ref) < 0.05


def test_too_long_input_is_an_error():
  config = gpt2.GPT2Config(
    architecture="GPT2Model",
    vocab_size=20,
    n_positions=6,
    n_embd=8,
    n_layer=1,
    n_head=2,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    pad_token_id=None,
    num_labels=None,
  )
  graphdef, params = functional.split(nnx.eval_shape(lambda: gpt2.build(config, rngs=nnx.Rngs(0))))
  shape = lambda ids: (
    jax.eval_shape(functools.partial(functional.call, graphdef), params, ids, jnp.ones(ids.shape)).shape
  )  # traces only
  assert shape(jnp.ones((1, 6), jnp.int32)) == (1, 6, 8)
  with pytest.raises(ValueError, match="sequence length 7 exceeds the 6 positions"):
    shape(jnp.ones((1, 7), jnp.int32))
