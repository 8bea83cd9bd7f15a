"""Fixed-shape numpy batches from a task's source, on grain: decoded in worker threads (or processes)
ahead of the accelerator, shuffled with a seed, resumable from a saved iterator state, sharded per process.

Every batch is a dict of numpy arrays with a leading axis of exactly `batch_size // shard.count`, plus
`mask`: float32, 1 for a real example and 0 for padding, so a jitted step sees one shape and evaluation
counts only real examples (the `evaluate` module's convention).

  eval_batches(source, prepare=..., batch_size=...)    one in-order pass; the last batch is zero-padded.
  adaptation_batches(source, prepare=..., batch_size=..., seed=...)
      an endless grain iterator: epoch e visits the examples in a seeded permutation of its own (grain's
      index shuffle, seeded with seed + e), and a batch that crosses an epoch boundary continues into the
      next epoch, so every batch is full. `iterator.get_state()` / `set_state(state)` resume it exactly;
      the training checkpoint stores that state (`TaskBatches`).

Global batch k is examples [k * batch_size, (k + 1) * batch_size) of the (shuffled) stream. With
`shard=Shard(index, count)` a process reads only the contiguous `index`-th of `count` equal parts of
every global batch, so the parts of all processes, in process order, are the global batch
(`jax.make_array_from_process_local_data` assembles it; `batch_shard` says which part a process
holds). Evaluation pads the pass to whole global batches, so every process gets as many batches.

`prepare(record) -> dict[str, np.ndarray]` turns one source record into fixed-shape arrays
(`vision_preprocessor`, `text_preprocessor`, `prompt_preprocessor`). It runs in `workers` threads of
this process (PIL resizing and numpy release the GIL), or, with `processes` > 0, in that many worker processes (then `prepare` and
the source are pickled; grain reads its absl flags there, so call this from an absl program, as
`adarank_jax.main` is). Nothing here needs TensorFlow. `model_inputs(batch, modality=...)` picks the arrays
a model takes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from jax.sharding import Mesh

from adarank_jax.core import train
from adarank_jax.data import glue, preprocess, prompts
from adarank_jax.data.task import Source

Batch = dict[str, np.ndarray]
Prepare = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
_INPUT_KEYS = {
  "vision": ("image",),
  "text": ("input_ids", "attention_mask", "token_type_ids"),
  "prompts": ("input_ids", "attention_mask"),  # generative tasks' unlabeled prompts (data/prompts.py)
}


class Shard(NamedTuple):
  """This process reads part `index` of `count` equal, contiguous parts of every global batch."""

  index: int = 0
  count: int = 1


WHOLE = Shard(0, 1)  # one process reads every batch whole


def batch_shard(mesh: Mesh, batch_size: int) -> Shard:
  """Which contiguous part of every global batch of `batch_size` this process's devices hold when a
  batch is split as `train.batch_sharding` says (`train.place_batches`): what this process's input
  pipeline reads. One process: the whole batch, Shard(0, 1)."""
  indices = train.batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
  rows = {index[0].indices(batch_size)[:2] for index in indices}
  start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
  size = stop - start
  if batch_size % size or start % size or sum(b - a for a, b in rows) < size:
    raise ValueError(
      f"batch_shard: this process's devices hold rows {sorted(rows)} of {batch_size}: not one part"
    )
  return Shard(index=start // size, count=batch_size // size)


def _clip_eval(record: Mapping[str, Any], *, image_size: int) -> dict[str, np.ndarray]:
  return {"image": preprocess.clip_eval(record["image"], image_size), "label": np.int32(record["label"])}


def vision_preprocessor(*, image_size: int) -> Prepare:
  """record -> {"image": float32 (image_size, image_size, 3), "label": int32 ()}, open_clip eval transform."""
  return functools.partial(_clip_eval, image_size=image_size)


def text_preprocessor(*, tokenizer_dir: str | os.PathLike[str], max_length: int = glue.MAX_LENGTH) -> Prepare:
  """record -> int32 token arrays (max_length,) + label, with the tokenizer of a local checkpoint dir."""
  return glue.TextPreprocessor(glue.load_tokenizer(tokenizer_dir), max_length=max_length)


def prompt_preprocessor(*, tokenizer_dir: str | os.PathLike[str], max_length: int) -> Prepare:
  """prompt record {"text"} -> right-padded int32 input_ids and attention_mask (max_length,)."""
  return prompts.PromptPreprocessor(glue.load_tokenizer(tokenizer_dir), max_length=max_length)


def model_inputs(batch: Mapping[str, np.ndarray], *, modality: str) -> dict[str, np.ndarray]:
  """The model's inputs of a batch: {"image"} (vision) or the token arrays (text, prompts); no label or
  mask."""
  if modality not in _INPUT_KEYS:
    raise ValueError(f"modality must be one of {sorted(_INPUT_KEYS)}, got {modality!r}")
  inputs = {k: batch[k] for k in _INPUT_KEYS[modality] if k in batch}
  if _INPUT_KEYS[modality][0] not in inputs:
    raise KeyError(f"a {modality} batch needs {_INPUT_KEYS[modality][0]!r}; it has {sorted(batch)}")
  return inputs


@dataclasses.dataclass(frozen=True)
class _Example:
  """prepare(record) plus mask 1: a real example (picklable, for worker processes)."""

  prepare: Prepare

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {**self.prepare(record), "mask": np.float32(1)}


def _local_batch_size(batch_size: int, shard: Shard) -> int:
  if batch_size < 1 or not 0 <= shard.index < shard.count or batch_size % shard.count:
    raise ValueError(
      f"batch_size {batch_size} and {shard}: need batch_size >= 1, 0 <= index < count and batch_size "
      "a multiple of count"
    )
  return batch_size // shard.count


def _iterate(
  dataset: grain.MapDataset, *, workers: int, processes: int, prefetch: int
) -> grain.DatasetIterator:
  """An iterator over `dataset` (whose elements are batches): `workers` threads make batches ahead of
  the consumer, `prefetch` of them at most, in this process or in each of `processes` worker processes."""
  if workers < 1 or processes < 0 or prefetch < 1:
    raise ValueError(
      f"need workers >= 1, processes >= 0 and prefetch >= 1; got {workers}, {processes}, {prefetch}"
    )
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=prefetch))
  if processes:
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))
  return iter(iterable)


def eval_batches(
  source: Source,
  *,
  prepare: Prepare,
  batch_size: int,
  max_examples: int = 0,
  shard: Shard = WHOLE,
  workers: int = 8,
  processes: int = 0,
  prefetch: int = 2,
) -> Iterator[Batch]:
  """One in-order pass over the first `max_examples` (0: all) examples, padded to whole global batches
  (padding: zeros with mask 0); this process's part of each."""
  if max_examples < 0:
    raise ValueError(f"need max_examples >= 0, got {max_examples}")
  local = _local_batch_size(batch_size, shard)
  count = min(len(source), max_examples) if max_examples else len(source)
  examples = grain.MapDataset.source(source)[:count].map(_Example(prepare))
  padding = -count % batch_size
  if padding:
    blank = {k: np.zeros_like(v) for k, v in _Example(prepare)(source[0]).items()}
    examples = grain.MapDataset.concatenate([examples, grain.MapDataset.source([blank]).repeat(padding)])
  iterator = _iterate(
    examples.batch(local)[shard.index :: shard.count], workers=workers, processes=processes, prefetch=prefetch
  )
  try:
    yield from iterator
  finally:
    iterator.close()


def adaptation_batches(
  source: Source,
  *,
  prepare: Prepare,
  batch_size: int,
  seed: int,
  shard: Shard = WHOLE,
  workers: int = 8,
  processes: int = 0,
  prefetch: int = 2,
) -> grain.DatasetIterator:
  """The endless, shuffled stream of full batches (module docstring); this process's part of each."""
  if len(source) == 0:
    raise ValueError("adaptation_batches needs a non-empty source")
  local = _local_batch_size(batch_size, shard)
  stream = grain.MapDataset.source(source).shuffle(seed).repeat().map(_Example(prepare))
  return _iterate(
    stream.batch(local)[shard.index :: shard.count], workers=workers, processes=processes, prefetch=prefetch
  )


class TaskBatches:
  """Every step's batches: one of every task, as `inputs_of(batch)`, from one iterator per task.

  `get_state()` is a JSON-able dict of every iterator's state, which `experiment.loop.fit` saves with each
  checkpoint; `set_state` (from `experiment.loop.resume`) continues every stream exactly where it was saved.
  """

  def __init__(self, iterators: Sequence[grain.DatasetIterator], inputs_of: Callable[[Batch], Batch]):
    self._iterators, self._inputs_of = list(iterators), inputs_of

  def __iter__(self) -> TaskBatches:
    return self

  def __next__(self) -> tuple[Batch, ...]:
    return tuple(self._inputs_of(next(iterator)) for iterator in self._iterators)

  def get_state(self) -> dict[str, Any]:
    return {"tasks": [iterator.get_state() for iterator in self._iterators]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    tasks = state.get("tasks") if isinstance(state, Mapping) else None
    if not isinstance(tasks, list) or len(tasks) != len(self._iterators):
      raise ValueError(
        f"data state {str(state)[:200]}: expected {{'tasks': [...]}} with one iterator state per task "
        f"({len(self._iterators)})"
      )
    for iterator, task_state in zip(self._iterators, tasks):
      iterator.set_state(task_state)

  def close(self) -> None:
    for iterator in self._iterators:  # worker threads or processes
      iterator.close()


class Subset:
  """The examples of `source` at `indices`, as a source of its own."""

  def __init__(self, source: Source, indices: np.ndarray):
    self._source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self.indices[index])]


def subset(source: Source, fraction: float, *, seed: int) -> Source:
  """`source` itself for fraction 1; else a seeded random max(1, round(fraction * N)) of its examples
  (in their original order): the data-fraction ablation's adaptation data."""
  if not 0 < fraction <= 1:
    raise ValueError(f"subset: fraction={fraction}; expected a value in (0, 1]")
  if fraction == 1:
    return source
  count = max(1, round(fraction * len(source)))
  return Subset(source, np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False)))
