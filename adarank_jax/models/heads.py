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

from adarank_jax import tree_util

EncodeTextFn = Callable[[np.ndarray], Any]  # tokens (N, context) int -> embeddings (N, dim)
TokenizeFn = Callable[[Sequence[str]], np.ndarray]  # texts -> tokens (N, context) int


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def zero_shot_head(encode_text_fn: EncodeTextFn, tokenize_fn: TokenizeFn, classnames: Sequence[str],
                   templates: Sequence[str], logit_scale: float, *, batch_size: int = 256) -> np.ndarray:
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

  Returns:
    float32 (C, dim).
  """
  if not classnames or not templates:
    raise ValueError(
        f"zero_shot_head needs classes and templates, got {len(classnames)} and {len(templates)}")
  texts = [template.format(name) for name in classnames for template in templates]
  tokens = np.asarray(tokenize_fn(texts))
  if tokens.ndim != 2 or tokens.shape[0] != len(texts):
    raise ValueError(
        f"tokenize_fn returned shape {tokens.shape} for {len(texts)} texts; expected (n, context)")
  chunks = []
  for start in range(0, len(texts), batch_size):
    chunk = tokens[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    chunks.append(np.asarray(encode_text_fn(padded), np.float32)[:len(chunk)])
  embeddings = _normalize(np.concatenate(chunks)).reshape(len(classnames), len(templates), -1)
  head = _normalize(embeddings.mean(axis=1)) * np.exp(np.float32(logit_scale))
  return head.astype(np.float32)


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


def head_cache_path(cache_dir: str | os.PathLike[str], *, key: str, classnames: Sequence[str],
                    templates: Sequence[str]) -> str:
  """<cache_dir>/head_<key>_<sha256 of class names + templates, 16 hex>.npy."""
  text_hash = hashlib.sha256(json.dumps([list(classnames), list(templates)]).encode()).hexdigest()[:16]
  return os.path.join(os.fspath(cache_dir), f"head_{key}_{text_hash}.npy")


def cached_zero_shot_head(cache_dir: str | os.PathLike[str] | None, *, key: str, encode_text_fn: EncodeTextFn,
                          tokenize_fn: TokenizeFn, classnames: Sequence[str], templates: Sequence[str],
                          logit_scale: float, batch_size: int = 256) -> np.ndarray:
  """`zero_shot_head`, read from / written (atomically) to `cache_dir`; None: no cache.

  Args:
    cache_dir: folder of .npy heads, or None.
    key: names the model and the task, e.g. f"{fingerprint(clip_tree)[:16]}_{task}"; the file name adds a
      hash of `classnames` and `templates`, so editing either rebuilds the head.
    encode_text_fn, tokenize_fn, classnames, templates, logit_scale, batch_size: as `zero_shot_head`.
  """
  build = lambda: zero_shot_head(encode_text_fn, tokenize_fn, classnames, templates, logit_scale,
                                 batch_size=batch_size)
  if cache_dir is None:
    return build()
  path = head_cache_path(cache_dir, key=key, classnames=classnames, templates=templates)
  if os.path.exists(path):
    head = np.load(path)
    valid = head.dtype == np.float32 and head.ndim == 2 and head.shape[0] == len(classnames)
    if not valid or not np.isfinite(head).all():
      raise ValueError(f"{path}: cached head has dtype {head.dtype} shape {head.shape}; expected finite "
                       f"float32 ({len(classnames)}, dim). Delete the file to rebuild it")
    return head
  head = build()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, head)
  os.replace(tmp, path)
  return head

