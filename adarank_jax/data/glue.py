"""GLUE text tasks: tokenizing records with the checkpoint's own tokenizer.

The tokenizer is read from the checkpoint's LOCAL directory (never a hub). Sentence pairs are joined by
the tokenizer itself (`tokenizer(text_a, text_b)`: [CLS] a [SEP] b [SEP] for BERT, <s> a </s></s> b </s>
for RoBERTa, plain concatenation for GPT-2), truncated and padded to `max_length` (128, as DARE / MergeLM
and AdaRank use). A tokenizer without a pad token (GPT-2) pads with its eos token.

`TextPreprocessor(tokenizer)` maps a registry text record {"text_a"[, "text_b"], "label"} to fixed-length
int32 arrays {"input_ids": (L,), "attention_mask": (L,), ["token_type_ids": (L,)], "label": ()}, which
`pipeline.eval_batches` / `pipeline.adaptation_batches` batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAX_LENGTH = 128


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
  """`transformers.AutoTokenizer` from a local checkpoint directory; pad = eos if it has no pad token."""
  import transformers  # pylint: disable=g-import-not-at-top  (heavy; only text runs need it)

  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(
      f"Tokenizer directory {model_dir} does not exist (expected a local HF checkpoint "
      f"directory with tokenizer.json / vocab files)"
    )
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"{model_dir}: no usable tokenizer files ({type(e).__name__}: {e})") from e
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise ValueError(f"{model_dir}: the tokenizer has neither a pad nor an eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def tokenize_texts(
  tokenizer: Any, text_a: Sequence[str], text_b: Sequence[str] | None, *, max_length: int = MAX_LENGTH
) -> dict[str, np.ndarray]:
  """Tokenizes (pairs of) texts: int32 arrays (N, max_length) for every field the tokenizer returns."""
  encoded = tokenizer(
    list(text_a),
    None if text_b is None else list(text_b),
    max_length=max_length,
    padding="max_length",
    truncation=True,
    return_tensors="np",
  )
  return {k: np.asarray(v, np.int32) for k, v in encoded.items()}


class TextPreprocessor:
  """record -> {"input_ids": int32 (max_length,), "attention_mask", ["token_type_ids"], "label": int32}.

  Safe to call from worker threads: calls into the (stateful) fast tokenizer are serialised by a lock.
  Picklable (for worker processes): each copy makes its own lock.
  """

  def __init__(self, tokenizer: Any, *, max_length: int = MAX_LENGTH):
    self.tokenizer, self.max_length = tokenizer, max_length
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {"tokenizer": self.tokenizer, "max_length": self.max_length}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["tokenizer"], max_length=state["max_length"])

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    text_b = [record["text_b"]] if "text_b" in record else None
    with self._lock:
      arrays = tokenize_texts(self.tokenizer, [record["text_a"]], text_b, max_length=self.max_length)
    return {**{k: v[0] for k, v in arrays.items()}, "label": np.int32(record["label"])}
