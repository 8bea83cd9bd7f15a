"""CLIP's byte-level BPE text tokenizer, without torch.

A port of open_clip 3.3.0's `SimpleTokenizer` (open_clip/tokenizer.py, itself copied from OpenAI's CLIP,
MIT License, Copyright (c) 2021 OpenAI) with its default 'lower' cleaning: ftfy.fix_text, HTML-unescape
twice, strip, collapse whitespace, lower-case. It gives the same token ids as open_clip, checked string by
string against it for every class name in every prompt template of the registered tasks
(tests/data/test_clip_tokenizer.py). Importing open_clip imports torch and torchvision (seconds); this module
needs only numpy, ftfy and regex, and reads the BPE vocabulary file open_clip ships, found without
importing it.
"""

import gzip
import html
import itertools
import math
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from adarank_jax.interop import openclip_config

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: lines 1..48894 of the BPE file (line 0 is a header)
_SOT, _EOT = "<start_of_text>", "<end_of_text>"


def _default_bpe_path() -> str:
  """open_clip's bundled BPE vocabulary, located without importing open_clip (or torch)."""
  return openclip_config.package_path(
    _BPE_FILE,
    what=f"its CLIP BPE vocabulary {_BPE_FILE}",
    instead='install the [torch] extra (pip install -e ".[torch]") or pass bpe_path=.',
  )


def _bytes_to_unicode() -> dict[int, str]:
  """Maps each of the 256 bytes to a printable character: printable latin-1 bytes to themselves, the rest
  (whitespace, control characters) to chr(256 + n), so no BPE symbol holds whitespace."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {b: chr(c) for b, c in zip(printable + others, printable + [256 + n for n in range(len(others))])}


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
  return set(itertools.pairwise(word))


def _clean(text: str) -> str:
  """open_clip's 'lower' cleaning."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


class Tokenizer:
  """OpenAI CLIP / OpenCLIP text tokenizer: `tokenizer(texts)` is int32 (n, context_length) token ids.

  Each text becomes [<start_of_text>] + encode(text) + [<end_of_text>], zero-padded to `context_length`;
  a longer one is cut to `context_length` tokens, the last replaced by <end_of_text>.

  Args:
    context_length: tokens per text (77 for every OpenAI / OpenCLIP CLIP model).
    bpe_path: the gzipped BPE merges file; default: open_clip's bpe_simple_vocab_16e6.txt.gz.

  Raises:
    ValueError: open_clip is not installed and no `bpe_path` is given, or `bpe_path` cannot be read.
  """

  def __init__(self, context_length: int = 77, bpe_path: str | os.PathLike | None = None):
    if context_length < 1:
      raise ValueError(f"context_length must be at least 1; got {context_length}.")
    path = _default_bpe_path() if bpe_path is None else os.fspath(bpe_path)
    try:
      with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: cannot read the CLIP BPE vocabulary: {e}") from e
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    self._byte_encoder = _bytes_to_unicode()
    byte_symbols = list(self._byte_encoder.values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [_SOT, _EOT]
    self._encoder = {symbol: i for i, symbol in enumerate(vocab)}
    self._ranks = {merge: i for i, merge in enumerate(merges)}
    self.context_length = context_length
    self.sot_token_id, self.eot_token_id = self._encoder[_SOT], self._encoder[_EOT]
    # BPE cache: byte-encoded word -> its token ids; the special tokens map to themselves, as in open_clip.
    self._cache: dict[str, list[int]] = {_SOT: [self.sot_token_id], _EOT: [self.eot_token_id]}
    self._pattern = regex.compile(
      rf"""{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+""",
      regex.IGNORECASE,
    )

  def _bpe(self, token: str) -> list[int]:
    """Token ids of one byte-encoded word: merges its symbols, lowest-ranked pair first."""
    if token in self._cache:
      return self._cache[token]
    word = (*token[:-1], token[-1] + "</w>")
    while len(word) > 1:
      first, second = min(_pairs(word), key=lambda pair: self._ranks.get(pair, math.inf))
      if (first, second) not in self._ranks:
        break
      merged, i = [], 0
      while i < len(word):
        try:
          j = word.index(first, i)
        except ValueError:
          merged.extend(word[i:])
          break
        merged.extend(word[i:j])
        if j < len(word) - 1 and word[j + 1] == second:
          merged.append(first + second)
          i = j + 2
        else:
          merged.append(first)
          i = j + 1
      word = tuple(merged)
    ids = [self._encoder[symbol] for symbol in word]
    self._cache[token] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE token ids of `text` after cleaning, without the start / end tokens."""
    ids = []
    for token in self._pattern.findall(_clean(text)):
      ids.extend(self._bpe("".join(self._byte_encoder[b] for b in token.encode("utf-8"))))
    return ids

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 (n, context_length) token ids of `texts`; a single string gives n = 1."""
    if isinstance(texts, str):
      texts = [texts]
    result = np.zeros((len(texts), self.context_length), np.int32)
    for row, text in zip(result, texts):
      tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
      if len(tokens) > self.context_length:
        tokens = tokens[: self.context_length]
        tokens[-1] = self.eot_token_id
      row[: len(tokens)] = tokens
    return result
