"""The one key-map engine: every format's rules round-trip bit-exactly, and errors list every problem."""

import ml_dtypes
import numpy as np
import pytest

from adarank_jax.core import tree_util
from adarank_jax.interop import hf, keymap, openclip
from adarank_jax.models import clip, decoder, gpt2, roberta

VISION = clip.VisionConfig(
  image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_width=32, output_dim=8, act="gelu"
)
TEXT = clip.TextConfig(
  context_length=8, vocab_size=50, width=16, layers=1, heads=2, mlp_width=32, output_dim=8, act="gelu"
)
_ROBERTA = dict(
  vocab_size=40,
  hidden_size=16,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=32,
  hidden_act="gelu",
  max_position_embeddings=20,
  type_vocab_size=1,
  layer_norm_eps=1e-5,
  pad_token_id=1,
)
ROBERTA = roberta.RobertaConfig(
  architecture="RobertaForSequenceClassification", position_ids="padding_offset", num_labels=3, **_ROBERTA
)
BERT = roberta.RobertaConfig(
  architecture="BertForSequenceClassification", position_ids="absolute", num_labels=2, **_ROBERTA
)
GPT2 = gpt2.GPT2Config(
  architecture="GPT2ForSequenceClassification",
  vocab_size=40,
  n_positions=12,
  n_embd=16,
  n_layer=2,
  n_head=2,
  n_inner=None,
  activation_function="gelu_new",
  layer_norm_epsilon=1e-5,
  scale_attn_weights=True,
  scale_attn_by_inverse_layer_idx=False,
  pad_token_id=0,
  num_labels=2,
)

QWEN2 = decoder.DecoderConfig(  # q/k/v biases, an untied lm_head
  architecture="Qwen2ForCausalLM",
  model_type="qwen2",
  vocab_size=40,
  hidden_size=16,
  intermediate_size=24,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=4,
  hidden_act="silu",
  rms_norm_eps=1e-6,
  rope_parameters=decoder.RopeParameters("default", 10000.0),
  attention_bias=False,
  mlp_bias=False,
  tie_word_embeddings=False,
  sliding_window=None,
  layer_types=("full_attention",) * 2,
  pad_token_id=0,
  num_labels=None,
)


def _random_state(expected, seed=0):
  """External key -> random array of the expected shape; every other key bfloat16 (dtypes must survive)."""
  rng = np.random.default_rng(seed)
  state = {}
  for i, (key, (shape, _)) in enumerate(sorted(expected.items())):
    value = rng.standard_normal(shape).astype(np.float32)
    state[key] = value.astype(ml_dtypes.bfloat16) if i % 2 else value
  return state


def _assert_bit_equal(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
    assert actual[key].tobytes() == np.ascontiguousarray(value).tobytes(), key


def _abstract(config):
  return tree_util.flatten(clip.abstract_params(config))


@pytest.mark.parametrize("prefix", ["visual.", ""])
def test_openclip_tower_round_trip(prefix):
  rules = keymap.prefixed(openclip.TOWER, "", prefix)
  state = _random_state(keymap.expected_keys(rules, _abstract(VISION)))
  tree = openclip.tree_from_state_dict(state, VISION, source="mem")
  assert tree["conv1"]["kernel"].shape == (8, 8, 3, 16)
  assert tree["transformer"]["resblocks"][1]["attn"]["in_proj"]["kernel"].shape == (16, 48)
  _assert_bit_equal(openclip.state_dict_from_tree(tree, prefix=prefix), state)


def test_openclip_clip_round_trip():
  config = clip.CLIPConfig(vision=VISION, text=TEXT)
  expected = keymap.expected_keys(openclip.CLIP, _abstract(config))
  assert expected["logit_scale"] == ((), np.float32)
  assert expected["token_embedding.weight"][0] == (50, 16)
  assert expected["visual.conv1.weight"][0] == (16, 3, 8, 8)
  state = _random_state(expected)
  tree = openclip.tree_from_state_dict(state, config, source="mem")
  assert np.ndim(tree["logit_scale"]) == 0
  _assert_bit_equal(openclip.state_dict_from_tree(tree), state)


@pytest.mark.parametrize(
  "config", [ROBERTA, BERT, GPT2, QWEN2, VISION], ids=["roberta", "bert", "gpt2", "qwen2", "clip_vision"]
)
def test_hf_round_trip(config):
  architecture = hf._architecture(config)
  state = _random_state(keymap.expected_keys(architecture.rules, architecture.abstract(config)))
  tree = hf.tree_from_state_dict(config, state, source="mem")
  _assert_bit_equal(hf.state_dict_from_tree(config, tree), state)


def test_hf_keys_of_packed_and_conv1d_layers():
  expected = keymap.expected_keys(hf.CLIP_VISION, _abstract(VISION))
  for x in "qkv":
    assert expected[f"vision_model.encoder.layers.1.self_attn.{x}_proj.weight"][0] == (16, 16)
    assert expected[f"vision_model.encoder.layers.1.self_attn.{x}_proj.bias"][0] == (16,)
  assert expected["vision_model.embeddings.patch_embedding.weight"][0] == (16, 3, 8, 8)
  assert expected["visual_projection.weight"][0] == (8, 16)
  architecture = hf._architecture(GPT2)
  gpt = keymap.expected_keys(architecture.rules, architecture.abstract(GPT2))
  assert gpt["transformer.h.0.attn.c_attn.weight"][0] == (16, 48)  # Conv1D: (in, out), not transposed
  assert gpt["score.weight"][0] == (2, 16)  # a Linear: transposed
  architecture = hf._architecture(QWEN2)
  qwen = keymap.expected_keys(architecture.rules, architecture.abstract(QWEN2))
  assert qwen["model.layers.1.self_attn.k_proj.weight"][0] == (8, 16)  # 2 kv heads x head_dim 4
  assert qwen["model.layers.1.self_attn.k_proj.bias"][0] == (8,)
  assert "model.layers.1.self_attn.o_proj.bias" not in qwen and qwen["lm_head.weight"][0] == (40, 16)


def test_engine_lists_every_problem_at_once():
  rules = keymap.prefixed(openclip.TOWER, "", "")
  state = _random_state(keymap.expected_keys(rules, _abstract(VISION)))
  del state["ln_post.bias"]
  state["extra.weight"] = np.zeros(3, np.float32)
  state["proj"] = np.zeros((16, 9), np.float32)
  state["ln_pre.weight"] = np.ones(16, np.int32)
  with pytest.raises(tree_util.StructureError) as info:
    keymap.tree_from_state_dict(rules, _abstract(VISION), state, source="file.pt", hint="the hint")
  message = str(info.value)
  assert message.startswith("file.pt: ")
  for part in (
    r"missing keys (1): ln_post.bias",
    r"unexpected keys (1): extra.weight",
    r"proj: expected shape (16, 8), got (16, 9)",
    "the hint",
  ):
    assert part in message
  del state["extra.weight"]
  state["ln_post.bias"] = np.zeros(16, np.float32)
  state["proj"] = np.zeros((16, 8), np.float32)
  with pytest.raises(
    tree_util.StructureError, match=r"file\.pt: dtype mismatches \(1\): ln_pre\.weight: dtype int32"
  ):
    keymap.tree_from_state_dict(rules, _abstract(VISION), state, source="file.pt")
  state["ln_pre.weight"] = np.full(16, np.nan, np.float32)
  with pytest.raises(tree_util.NonFiniteError, match=r"file\.pt: NaN or Inf values in ln_pre\.weight"):
    keymap.tree_from_state_dict(rules, _abstract(VISION), state, source="file.pt")


def test_paths_without_a_rule_are_named():
  with pytest.raises(tree_util.StructureError, match=r"tree: no key-map rule for tree paths extra/kernel"):
    keymap.state_dict_from_tree(hf.CLIP_VISION, {"extra": {"kernel": np.zeros((2, 2))}})
