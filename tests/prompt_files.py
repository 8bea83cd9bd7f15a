"""A tiny word-level tokenizer and prompt files, written by the tests that need them."""

import json

import tokenizers
import transformers

WORDS = "the cat sat on a mat dog ran far away big small red blue one two three four".split()


def tokenizer(directory, *, bos=False):
  """A word-level PreTrainedTokenizerFast over WORDS (+ <pad>, </s>, <unk>, and <s> with `bos`, prepended
  to every input), saved in `directory`."""
  directory.mkdir(parents=True, exist_ok=True)
  special = ["<pad>", "</s>", "<unk>"] + (["<s>"] if bos else [])
  vocab = {word: i for i, word in enumerate(special + WORDS)}
  model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  if bos:
    model.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=model,
    pad_token="<pad>",
    eos_token="</s>",
    unk_token="<unk>",
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
