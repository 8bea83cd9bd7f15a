"""The tiny random decoders of the decoder CLI tests: their shared config fields and a pretrained
Qwen2 causal LM written as a sharded HF directory with the tests' tokenizer."""

import torch
import transformers

from tests import prompt_files

FIELDS = dict(  # every tiny Llama, Mistral or Qwen2 of the tests
  hidden_size=16,
  intermediate_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  initializer_range=0.2,
)


def pretrained_causal_lm(directory):
  """`directory`: a random Qwen2ForCausalLM (seed 0, untied lm_head: a tensor of its own, unmerged like
  the embeddings) in 20 KB safetensors shards, and prompt_files' tokenizer. Returns (tokenizer, model)."""
  tokenizer = prompt_files.tokenizer(directory)
  config = transformers.Qwen2Config(
    **FIELDS, tie_word_embeddings=False, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
  )
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  model.save_pretrained(directory, max_shard_size="20KB")
  assert (directory / "model.safetensors.index.json").is_file()
  return tokenizer, model
