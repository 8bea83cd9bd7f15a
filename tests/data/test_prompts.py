"""Prompt files: reading .jsonl and .txt, the errors that name file and line, tokenization, batching."""

import pickle

import numpy as np
import pytest

from adarank_jax.data import glue, pipeline, prompts
from tests import prompt_files

TEXTS = ["the cat sat on a mat", "a dog ran", "big red one two three four the cat sat on a mat"]


def test_jsonl_and_txt_give_the_prompts_in_file_order(tmp_path):
  jsonl = prompt_files.write_jsonl(tmp_path / "a.jsonl", TEXTS, field="prompt")
  assert prompts.read_prompts(jsonl, field="prompt") == TEXTS
  txt = prompt_files.write_txt(tmp_path / "a.txt", TEXTS)
  source = prompts.open_prompts(txt)
  assert len(source) == 3 and source[1] == {"text": "a dog ran"}
  crlf = tmp_path / "crlf.txt"
  crlf.write_bytes(b"a dog\r\nthe cat")  # Windows line ends, no final newline
  assert prompts.read_prompts(crlf) == ["a dog", "the cat"]


@pytest.mark.parametrize(
  "name, content, message",
  [
    ("empty.jsonl", b"", "empty.jsonl: the file is empty"),
    ("blank.txt", b"a dog\n\nthe cat\n", "blank.txt, line 2: blank"),
    ("latin1.txt", b"a dog\ncaf\xe9\n", "latin1.txt, line 2: not UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "bad.jsonl, line 2: not JSON"),
    ("field.jsonl", b'{"text": "a"}\n{"prompt": "b"}\n', "field.jsonl, line 2: no field 'text'"),
    ("type.jsonl", b'{"text": 3}\n', "type.jsonl, line 1: field 'text' is 3"),
    ("list.jsonl", b'["a"]\n', "list.jsonl, line 1: a JSON list"),
    ("prompts.csv", b"a\n", "prompts.csv: prompt files end in .jsonl or .txt"),
  ],
)
def test_bad_files_are_errors_naming_file_and_line(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(prompts.PromptFileError, match=message):
    prompts.read_prompts(tmp_path / name)
  with pytest.raises(prompts.PromptFileError, match="missing.txt: cannot be read"):
    prompts.read_prompts(tmp_path / "missing.txt")


def test_tokenized_with_the_models_tokenizer_right_padded_and_truncated(tmp_path):
  tokenizer = prompt_files.tokenizer(tmp_path / "tok", bos=True)
  own = tokenizer("a dog ran")["input_ids"]
  assert own[0] == tokenizer.bos_token_id and len(tokenizer(TEXTS[2])["input_ids"]) > len(own) + 2
  length = len(own) + 2
  prepare = pipeline.prompt_preprocessor(tokenizer_dir=tmp_path / "tok", max_length=length)
  short, long = prepare({"text": "a dog ran"}), prepare({"text": TEXTS[2]})
  expected = own + [tokenizer.pad_token_id] * 2
  np.testing.assert_array_equal(short["input_ids"], expected)
  np.testing.assert_array_equal(short["attention_mask"], [1] * len(own) + [0, 0])
  np.testing.assert_array_equal(long["input_ids"], tokenizer(TEXTS[2])["input_ids"][:length])  # cut right
  assert (
    long["attention_mask"].all()
    and short["input_ids"].dtype == np.int32
    and set(short) == {"input_ids", "attention_mask"}
  )
  again = pickle.loads(pickle.dumps(prepare))  # for worker processes
  np.testing.assert_array_equal(again({"text": "a dog ran"})["input_ids"], expected)
  with pytest.raises(ValueError, match="max_length=1"):
    prompts.PromptPreprocessor(glue.load_tokenizer(tmp_path / "tok"), max_length=1)


def test_batches_follow_the_pipelines_conventions(tmp_path):
  prompt_files.tokenizer(tmp_path / "tok")
  prepare = pipeline.prompt_preprocessor(tokenizer_dir=tmp_path / "tok", max_length=8)
  source = prompts.open_prompts(prompt_files.write_txt(tmp_path / "p.txt", TEXTS * 3))  # 9 prompts
  batches = list(pipeline.eval_batches(source, prepare=prepare, batch_size=4, workers=1))
  assert len(batches) == 3 and batches[0]["input_ids"].shape == (4, 8)
  np.testing.assert_array_equal(batches[2]["mask"], [1, 0, 0, 0])  # padded rows: mask 0, zero tokens
  assert not batches[2]["attention_mask"][1:].any()
  inputs = pipeline.model_inputs(batches[0], modality="prompts")
  assert set(inputs) == {"input_ids", "attention_mask"}

  def stream():
    it = pipeline.adaptation_batches(source, prepare=prepare, batch_size=4, seed=3, workers=2)
    return [next(it)["input_ids"] for _ in range(3)]

  first, second = stream(), stream()  # seeded: the same batches every time
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
