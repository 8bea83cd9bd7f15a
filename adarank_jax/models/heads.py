"""Zero-shot CLIP classification heads, built as Task Arithmetic's `build_classification_head` builds them.

For each class: the text embeddings of every template are L2-normalised, averaged, and the mean is
re-normalised; the (num_classes, dim) matrix is multiplied by exp(logit_scale). The head is a bias-free
linear layer on L2-normalised image features: `classify(features, head)`.

This module is pure: it takes `encode_text_fn` / `tokenize_fn` as functions (CLIP's tokenizer is
`adarank_jax.data.clip_tokenizer.Tokenizer`). Heads can be cached on disk as .npy files
keyed by the model and task (`key`, e.g. a `fingerprint` of the CLIP tree + the task name) and a hash of
the class names and templates.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from adarank_jax.core import tree_util
from adarank_jax.storage import files

EncodeTextFn = Callable[[np.ndarray], Any]  # tokens (N, context) int -> embeddings (N, dim)
TokenizeFn = Callable[[Sequence[str]], np.ndarray]  # texts -> tokens (N, context) int


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zero_shot_head(
  encode_text_fn: EncodeTextFn,
  tokenize_fn: TokenizeFn,
  classnames: Sequence[str],
  templates: Sequence[str],
  logit_scale: float,
  *,
  batch_size: int = 256,
  vocab_size: int | None = None,
  source: str = "the text tower",
) -> np.ndarray:
  """The zero-shot head of one task.

  Args:
    encode_text_fn: tokens (n, context) -> text embeddings (n, dim) (CLIP.encode_text, unnormalised).
    tokenize_fn: list of n strings -> tokens (n, context).
    classnames: the task's C class names.
    templates: T prompt patterns, each with one "{}".
    logit_scale: CLIP's log temperature parameter (ln 100 = 4.6052 for OpenAI models); the head is
      scaled by exp(logit_scale).
    batch_size: texts per encode_text call; every call gets exactly this many rows (the last is padded
      by repeating a row) so a jitted encoder compiles once.
    vocab_size: the text tower's vocabulary size; token ids must lie in [0, vocab_size) (a Flax embedding
      returns NaN for ids outside it, where torch raises). None: not checked.
    source: the model (config) named in errors.

  Returns:
    float32 (C, dim), finite.

  Raises:
    ValueError: token ids outside the vocabulary, or NaN/Inf in the head.
  """
  if not classnames or not templates:
    raise ValueError(
      f"zero_shot_head needs classes and templates, got {len(classnames)} and {len(templates)}"
    )
  texts = [template.format(name) for name in classnames for template in templates]
  tokens = np.asarray(tokenize_fn(texts))
  if tokens.ndim != 2 or tokens.shape[0] != len(texts):
    raise ValueError(
      f"tokenize_fn returned shape {tokens.shape} for {len(texts)} texts; expected (n, context)"
    )
  check_token_ids(tokens, vocab_size, source=source)
  chunks = []
  for start in range(0, len(texts), batch_size):
    chunk = tokens[start : start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    chunks.append(np.asarray(encode_text_fn(padded), np.float32)[: len(chunk)])
  embeddings = _normalize(np.concatenate(chunks)).reshape(len(classnames), len(templates), -1)
  head = _normalize(embeddings.mean(axis=1)) * np.exp(np.float32(logit_scale))
  if not np.isfinite(head).all():
    raise ValueError(
      f"{source}: the zero-shot head of classes {list(classnames)[:5]}... holds NaN or Inf "
      f"(text embeddings: {_finiteness(embeddings)}, logit_scale {logit_scale}); check the "
      f"text tower's weights and that the tokenizer matches the model"
    )
  return head.astype(np.float32)


def _finiteness(array: np.ndarray) -> str:
  bad = int(np.size(array) - np.isfinite(array).sum())
  return f"{bad} of {np.size(array)} values non-finite" if bad else "finite (a zero-norm embedding?)"


def check_token_ids(tokens: np.ndarray, vocab_size: int | None, *, source: str) -> None:
  """Raises ValueError naming `source` unless every id of `tokens` lies in [0, vocab_size)."""
  if vocab_size is None or np.size(tokens) == 0:
    return
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{source}: token ids have dtype {tokens.dtype}; expected integers")
  low, high = int(tokens.min()), int(tokens.max())
  if low < 0 or high >= vocab_size:
    raise ValueError(
      f"{source}: the tokenizer gives token ids up to max token id {high} (min {low}) but the text tower "
      f"has vocab_size {vocab_size}: ids outside [0, {vocab_size}) would give NaN embeddings (a Flax "
      f"embedding returns NaN out of range). Use the model config whose text tower matches the tokenizer "
      f"(CLIP's tokenizer needs vocab_size 49408)."
    )


def classify(features: jnp.ndarray, head: jnp.ndarray) -> jnp.ndarray:
  """Logits (N, C) = normalize(features (N, dim)) @ head (C, dim).T.

  As Task Arithmetic's ClassificationHead(normalize=True): a bias-free linear layer on unit features.
  """
  features = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features @ head.T


def fingerprint(tree: Mapping[str, Any]) -> str:
  """A sha256 of a param tree's paths, shapes, dtypes and values (e.g. the CLIP text tower + logit_scale)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(tree_util.flatten(tree).items()):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{path}:{array.shape}:{array.dtype};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def head_cache_path(
  cache_dir: str | os.PathLike[str], *, key: str, classnames: Sequence[str], templates: Sequence[str]
) -> str:
  """<cache_dir>/head_<key>_<sha256 of class names + templates, 16 hex>.npy."""
  text_hash = hashlib.sha256(json.dumps([list(classnames), list(templates)]).encode()).hexdigest()[:16]
  return os.path.join(os.fspath(cache_dir), f"head_{key}_{text_hash}.npy")


def cached_zero_shot_head(
  cache_dir: str | os.PathLike[str] | None,
  *,
  key: str,
  encode_text_fn: EncodeTextFn,
  tokenize_fn: TokenizeFn,
  classnames: Sequence[str],
  templates: Sequence[str],
  logit_scale: float,
  batch_size: int = 256,
  vocab_size: int | None = None,
  source: str = "the text tower",
) -> np.ndarray:
  """`zero_shot_head`, read from / written (atomically) to `cache_dir`; None: no cache.

  Only finite heads are written, and a cached head that is not finite float32 is refused.

  Args:
    cache_dir: folder of .npy heads, or None.
    key: names the model and the task, e.g. f"{fingerprint(clip_tree)[:16]}_{task}"; the file name adds a
      hash of `classnames` and `templates`, so editing either rebuilds the head.
    encode_text_fn, tokenize_fn, classnames, templates, logit_scale, batch_size, vocab_size, source: as
      `zero_shot_head`.
  """
  build = lambda: zero_shot_head(
    encode_text_fn,
    tokenize_fn,
    classnames,
    templates,
    logit_scale,
    batch_size=batch_size,
    vocab_size=vocab_size,
    source=source,
  )
  if cache_dir is None:
    return build()
  path = head_cache_path(cache_dir, key=key, classnames=classnames, templates=templates)
  if os.path.exists(path):
    head = np.load(path)
    valid = head.dtype == np.float32 and head.ndim == 2 and head.shape[0] == len(classnames)
    if not valid or not np.isfinite(head).all():
      what = "" if not valid or np.isfinite(head).all() else " and holds NaN or Inf"
      raise ValueError(
        f"{path}: cached head has dtype {head.dtype} shape {head.shape}{what}; expected "
        f"finite float32 ({len(classnames)}, dim). Delete the file to rebuild it"
      )
    return head
  head = build()
  if not np.isfinite(head).all():  # zero_shot_head checks this too; never write a non-finite head
    raise ValueError(f"{path}: refusing to cache a head with NaN or Inf")

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # np.save(tmp) would append ".npy" to the temporary name
      np.save(f, head)

  files.write_atomic(path, write)
  return head
