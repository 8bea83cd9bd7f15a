"""Fixed-shape numpy batches from a task's source, preprocessed in worker threads ahead of the accelerator.

Every batch is a dict of numpy arrays with a leading axis of exactly `batch_size`, plus
`mask`: float32 (batch_size,), 1 for a real example and 0 for padding, so a jitted step sees one shape
and evaluation counts only real examples (the `evaluate` module's convention).

  eval_batches(source, prepare=..., batch_size=...)   one in-order pass; the last batch is zero-padded.
  adaptation_stream(source, prepare=..., batch_size=..., seed=..., start_batch=k)
      an endless `AdaptationStream`: each epoch a fresh seeded permutation, every batch full; it starts
      after k batches, and `stream.position` ({"epoch", "index"}) / `stream.restore(position)` resume it
      exactly.

`prepare(record) -> dict[str, np.ndarray]` turns one source record into fixed-shape arrays
(`vision_preprocessor`, `text_preprocessor`). It runs in a thread pool of `workers` threads (PIL
resizing and numpy release the GIL) with up to `prefetch` batches in flight. Nothing here needs
TensorFlow. `model_inputs(batch, kind=...)` picks the arrays a model takes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from adarank_jax.data import glue, preprocess, registry

Batch = dict[str, np.ndarray]
Prepare = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
_INPUT_KEYS = {"vision": ("image",), "text": ("input_ids", "attention_mask", "token_type_ids")}


def vision_preprocessor(*, image_size: int) -> Prepare:
  """record -> {"image": float32 (image_size, image_size, 3), "label": int32 ()}, open_clip eval transform."""

  def prepare(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"image": preprocess.clip_eval(record["image"], image_size), "label": np.int32(record["label"])}

  return prepare


def text_preprocessor(*, tokenizer_dir: str | os.PathLike[str], max_length: int = glue.MAX_LENGTH) -> Prepare:
  """record -> int32 token arrays (max_length,) + label, with the tokenizer of a local checkpoint dir."""
  return glue.text_preprocessor(glue.load_tokenizer(tokenizer_dir), max_length=max_length)


def model_inputs(batch: Mapping[str, np.ndarray], *, kind: str) -> dict[str, np.ndarray]:
  """The model's inputs of a batch: {"image"} (vision) or the token arrays (text); no label / mask."""
  if kind not in _INPUT_KEYS:
    raise ValueError(f"kind must be one of {sorted(_INPUT_KEYS)}, got {kind!r}")
  inputs = {k: batch[k] for k in _INPUT_KEYS[kind] if k in batch}
  if _INPUT_KEYS[kind][0] not in inputs:
    raise KeyError(f"a {kind} batch needs {_INPUT_KEYS[kind][0]!r}; it has {sorted(batch)}")
  return inputs


def collate(examples: list[dict[str, np.ndarray]], batch_size: int) -> Batch:
  """Stacks examples and zero-pads to `batch_size`; adds the float32 `mask`."""
  if not 0 < len(examples) <= batch_size:
    raise ValueError(f"collate got {len(examples)} examples for batch_size {batch_size}")
  batch = {}
  for key in examples[0]:
    stacked = np.stack([e[key] for e in examples])
    padding = np.zeros((batch_size - len(examples),) + stacked.shape[1:], stacked.dtype)
    batch[key] = np.concatenate([stacked, padding]) if len(padding) else stacked
  batch["mask"] = (np.arange(batch_size) < len(examples)).astype(np.float32)
  return batch


class _Prefetcher:
  """Runs `prepare(source[i])` for a stream of indices in a thread pool, in order, `depth` results ahead."""

  def __init__(
    self, source: registry.Source, prepare: Prepare, indices: Iterator[int], *, workers: int, depth: int
  ):
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    self._source, self._prepare, self._indices, self._depth = source, prepare, indices, depth
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adarank_data")
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
    self._fill()

  def _load(self, index: int) -> dict[str, np.ndarray]:
    return self._prepare(self._source[index])

  def _fill(self) -> None:
    while len(self._pending) < self._depth:
      index = next(self._indices, None)
      if index is None:
        return
      self._pending.append(self._pool.submit(self._load, index))

  def take(self, count: int) -> list[dict[str, np.ndarray]]:
    """The next `count` results (fewer at the end of a finite index stream)."""
    out = []
    while len(out) < count and self._pending:
      out.append(self._pending.popleft().result())
      self._fill()
    return out

  def close(self) -> None:
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(
  source: registry.Source,
  *,
  prepare: Prepare,
  batch_size: int,
  max_examples: int = 0,
  workers: int = 8,
  prefetch: int = 2,
) -> Iterator[Batch]:
  """One in-order pass over the first `max_examples` (0: all) examples; the last batch is padded."""
  if batch_size < 1 or max_examples < 0:
    raise ValueError(f"need batch_size >= 1 and max_examples >= 0, got {batch_size} and {max_examples}")
  count = min(len(source), max_examples) if max_examples else len(source)
  prefetcher = _Prefetcher(
    source, prepare, iter(range(count)), workers=workers, depth=batch_size * (prefetch + 1)
  )
  try:
    while examples := prefetcher.take(batch_size):
      yield collate(examples, batch_size)
  finally:
    prefetcher.close()


class Subset:
  """The examples of `source` at `indices`, as a source of its own."""

  def __init__(self, source: registry.Source, indices: np.ndarray):
    self._source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self.indices[index])]


def subset(source: registry.Source, fraction: float, *, seed: int) -> registry.Source:
  """`source` itself for fraction 1; else a seeded random max(1, round(fraction * N)) of its examples
  (in their original order): the data-fraction ablation's adaptation data."""
  if not 0 < fraction <= 1:
    raise ValueError(f"subset: fraction={fraction}; expected a value in (0, 1]")
  if fraction == 1:
    return source
  count = max(1, round(fraction * len(source)))
  return Subset(source, np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False)))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: a permutation that depends only on (seed, epoch)."""
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


class AdaptationStream:
  """An endless stream of full, shuffled batches that a checkpoint can stop and resume exactly.

  Epoch e visits `epoch_permutation(len(source), seed, e)`; a batch that crosses an epoch boundary
  continues into the next epoch, so every batch is full (mask all ones). `position` is the (epoch, index)
  of the next example to be returned, as a small dict of ints.
  """

  def __init__(
    self,
    source: registry.Source,
    *,
    prepare: Prepare,
    batch_size: int,
    seed: int,
    workers: int = 8,
    prefetch: int = 2,
  ):
    if len(source) == 0:
      raise ValueError("AdaptationStream needs a non-empty source")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._source, self._prepare = source, prepare
    self.batch_size, self.seed = batch_size, seed
    self._workers, self._depth = workers, batch_size * (prefetch + 1)
    self._epoch, self._index = 0, 0
    self._prefetcher: _Prefetcher | None = None

  @property
  def position(self) -> dict[str, int]:
    """{"epoch": e, "index": i}: the next example is epoch_permutation(..., e)[i]."""
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, position: Mapping[str, int]) -> None:
    """Continues from a saved `position`; the following batches equal those the saved stream would give."""
    if set(position) != {"epoch", "index"}:
      raise ValueError(f"position must have exactly the keys 'epoch' and 'index', got {sorted(position)}")
    epoch, index = int(position["epoch"]), int(position["index"])
    if epoch < 0 or not 0 <= index < len(self._source):
      raise ValueError(f"position {dict(position)} out of range for a source of {len(self._source)} examples")
    self.close()
    self._epoch, self._index = epoch, index

  def _indices(self, epoch: int, index: int) -> Iterator[int]:
    while True:
      yield from epoch_permutation(len(self._source), self.seed, epoch)[index:].tolist()
      epoch, index = epoch + 1, 0

  def __iter__(self) -> AdaptationStream:
    return self

  def __next__(self) -> Batch:
    if self._prefetcher is None:
      self._prefetcher = _Prefetcher(
        self._source,
        self._prepare,
        self._indices(self._epoch, self._index),
        workers=self._workers,
        depth=self._depth,
      )
    batch = collate(self._prefetcher.take(self.batch_size), self.batch_size)
    consumed = self._epoch * len(self._source) + self._index + self.batch_size
    self._epoch, self._index = divmod(consumed, len(self._source))
    return batch

  def close(self) -> None:
    """Stops the worker threads; the next batch restarts them from `position`."""
    if self._prefetcher is not None:
      self._prefetcher.close()
      self._prefetcher = None


def adaptation_stream(
  source: registry.Source,
  *,
  prepare: Prepare,
  batch_size: int,
  seed: int,
  start_batch: int = 0,
  workers: int = 8,
  prefetch: int = 2,
) -> AdaptationStream:
  """An `AdaptationStream` positioned after `start_batch` batches (a checkpoint's batches-consumed count)."""
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  stream = AdaptationStream(
    source, prepare=prepare, batch_size=batch_size, seed=seed, workers=workers, prefetch=prefetch
  )
  epoch, index = divmod(start_batch * batch_size, len(source))
  stream.restore({"epoch": epoch, "index": index})
  return stream
