"""A tiny byte-level BPE tokenizer and prompt files, written by the tests that need them."""

import json

import tokenizers
import transformers

WORDS = "the cat sat on a mat dog ran far away big small red blue one two three four".split()


def tokenizer(directory, *, bos=False):
  """A byte-level BPE tokenizer trained on WORDS, with <pad>, </s> (and with `bos` a <s> prepended to
  every input), saved as a PreTrainedTokenizerFast in `directory`. Byte-level BPE, as Qwen2's own: in a
  Qwen2 model directory AutoTokenizer reads it as a Qwen2 tokenizer, which keeps its tokens."""
  directory.mkdir(parents=True, exist_ok=True)
  special = ["<pad>", "</s>"] + (["<s>"] if bos else [])
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(
    [" ".join(WORDS)] * 3, vocab_size=300, min_frequency=1, special_tokens=special, show_progress=False
  )
  if bos:
    bpe.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=bpe._tokenizer,  # pylint: disable=protected-access
    pad_token="<pad>",
    eos_token="</s>",
    **({"bos_token": "<s>"} if bos else {}),
    model_input_names=["input_ids", "attention_mask"],
  )
  fast.save_pretrained(directory)
  return fast


def write_jsonl(path, prompts, field="text"):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({field: p, "id": i}) + "\n" for i, p in enumerate(prompts)))
  return path


def write_txt(path, prompts):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(prompts) + "\n")
  return path
