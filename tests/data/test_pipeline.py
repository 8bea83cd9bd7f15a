"""Tests for adarank_jax.data.pipeline: fixed-shape padded batches, prefetching, resumable streams."""

import json
import os
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from adarank_jax.data import image_folder, pipeline, preprocess, registry
from adarank_jax.data.task import DatasetMismatchError, DatasetNotFoundError, Task


class _ListSource:
  """An in-memory source of {"x": (2,) float32, "label": int}; counts loads."""

  def __init__(self, n):
    self.n, self.loads, self.lock = n, 0, threading.Lock()

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    with self.lock:
      self.loads += 1
    return {"x": np.asarray([i, -i], np.float32), "label": i % 3}


def _identity(record):
  return {"x": record["x"], "label": np.int32(record["label"])}


def test_eval_batches_fixed_shape_padding_and_order():
  batches = list(pipeline.eval_batches(_ListSource(10), prepare=_identity, batch_size=4, workers=3))
  assert len(batches) == 3
  for batch in batches:
    assert batch["x"].shape == (4, 2) and batch["label"].shape == (4,) and batch["mask"].shape == (4,)
    assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(batches[-1]["x"][2:], 0)
  real = np.concatenate([b["x"][b["mask"] > 0, 0] for b in batches])
  np.testing.assert_array_equal(real, np.arange(10))  # one pass, in order
  assert sum(b["mask"].sum() for b in batches) == 10


def test_eval_batches_runs_ahead_of_the_consumer():
  source = _ListSource(64)
  batches = pipeline.eval_batches(source, prepare=_identity, batch_size=4, workers=2, prefetch=3)
  next(batches)
  deadline = time.time() + 5
  while source.loads < 16 and time.time() < deadline:
    time.sleep(0.01)
  assert source.loads >= 16  # (prefetch + 1) batches were loaded while the consumer held only one
  batches.close()


def test_worker_errors_propagate():
  def broken(record):
    if record["label"] == 2:
      raise RuntimeError("decode failed")
    return _identity(record)

  with pytest.raises(RuntimeError, match="decode failed"):
    list(pipeline.eval_batches(_ListSource(8), prepare=broken, batch_size=4))


def _stream(n=10, batch_size=4, seed=0, **kwargs):
  return pipeline.adaptation_batches(
    _ListSource(n), prepare=_identity, batch_size=batch_size, seed=seed, workers=2, **kwargs
  )


def _ids(batch):
  return batch["x"][:, 0].astype(int).tolist()


def test_adaptation_epochs_are_seeded_permutations():
  stream = _stream(n=12, batch_size=4, seed=3)
  first_epoch = sum((_ids(next(stream)) for _ in range(3)), [])
  second_epoch = sum((_ids(next(stream)) for _ in range(3)), [])
  assert sorted(first_epoch) == list(range(12)) and sorted(second_epoch) == list(range(12))
  assert first_epoch != second_epoch  # reshuffled per epoch
  assert first_epoch != list(range(12))
  again = _stream(n=12, batch_size=4, seed=3)
  assert sum((_ids(next(again)) for _ in range(3)), []) == first_epoch  # the seed fixes the order
  other = _stream(n=12, batch_size=4, seed=4)
  assert sum((_ids(next(other)) for _ in range(3)), []) != first_epoch
  for iterator in (stream, again, other):
    iterator.close()


def test_adaptation_batches_are_full_across_epoch_boundaries():
  stream = _stream(n=10, batch_size=4)
  batches = [next(stream) for _ in range(5)]  # 20 examples = 2 epochs
  assert all(b["mask"].tolist() == [1, 1, 1, 1] and b["mask"].dtype == np.float32 for b in batches)
  ids = sum((_ids(b) for b in batches), [])
  assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))
  stream.close()


def test_saved_iterator_state_reproduces_the_stream():
  stream = _stream(n=10, batch_size=4, seed=7)
  for _ in range(3):
    next(stream)
  saved = json.loads(json.dumps(stream.get_state()))  # what a checkpoint stores
  expected = [_ids(next(stream)) for _ in range(4)]
  resumed = _stream(n=10, batch_size=4, seed=7)
  resumed.set_state(saved)
  assert [_ids(next(resumed)) for _ in range(4)] == expected
  stream.set_state(saved)  # the same stream rewinds, dropping what it had prefetched
  assert [_ids(next(stream)) for _ in range(4)] == expected
  stream.close()
  resumed.close()


def test_task_batches_save_and_restore_every_task():
  def task_batches(seeds):
    return pipeline.TaskBatches([_stream(n=9, batch_size=3, seed=s) for s in seeds], lambda b: {"x": b["x"]})

  batches = task_batches((0, 1))
  for _ in range(4):
    next(batches)
  saved = json.loads(json.dumps(batches.get_state()))
  expected = [tuple(_ids(b) for b in next(batches)) for _ in range(3)]
  resumed = task_batches((0, 1))
  resumed.set_state(saved)
  assert [tuple(_ids(b) for b in next(resumed)) for _ in range(3)] == expected
  with pytest.raises(ValueError, match="one iterator state per task"):
    task_batches((0, 1, 2)).set_state(saved)
  batches.close()
  resumed.close()


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(count):
  whole = _stream(n=10, batch_size=8, seed=2)
  parts = [_stream(n=10, batch_size=8, seed=2, shard=pipeline.Shard(i, count)) for i in range(count)]
  for _ in range(4):  # across epoch boundaries
    batch = next(whole)
    local = [next(part) for part in parts]
    assert all(p["x"].shape == (8 // count, 2) for p in local)
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in local]), batch["x"])
  evaluated = [
    list(pipeline.eval_batches(_ListSource(10), prepare=_identity, batch_size=4, shard=pipeline.Shard(i, 2)))
    for i in range(2)
  ]
  assert [len(e) for e in evaluated] == [3, 3]  # as many batches on every process
  joined = np.concatenate([np.concatenate([a["x"], b["x"]]) for a, b in zip(*evaluated)])
  masks = np.concatenate([np.concatenate([a["mask"], b["mask"]]) for a, b in zip(*evaluated)])
  np.testing.assert_array_equal(joined[masks > 0, 0], np.arange(10))
  with pytest.raises(ValueError, match="multiple of count"):
    _stream(n=10, batch_size=6, shard=pipeline.Shard(0, 4))
  for iterator in [whole, *parts]:
    iterator.close()


def test_worker_processes_give_the_threads_batches():
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read its absl flags (parsed by app.run in main)
  records = [_ListSource(10)[i] for i in range(10)]  # a picklable source: a list

  def _stream(n, **kwargs):
    del n
    return pipeline.adaptation_batches(records, prepare=_identity, workers=2, **kwargs)

  threads = _stream(n=10, batch_size=4, seed=1)
  expected = [_ids(next(threads)) for _ in range(4)]
  processes = _stream(n=10, batch_size=4, seed=1, processes=2)
  assert [_ids(next(processes)) for _ in range(2)] == expected[:2]
  saved = processes.get_state()
  processes.close()
  resumed = _stream(n=10, batch_size=4, seed=1, processes=2)
  resumed.set_state(saved)
  assert [_ids(next(resumed)) for _ in range(2)] == expected[2:]
  resumed.close()
  threads.close()
  evaluated = pipeline.eval_batches(records, prepare=_identity, batch_size=4, processes=2)
  assert np.concatenate([b["x"][b["mask"] > 0, 0] for b in evaluated]).tolist() == list(range(10))


def _prepared_rendered_sst2(tmp_path):
  """A tiny RenderedSST2 prepared through the real image-folder path: 3 + 2 RGB images of different sizes."""
  manual = tmp_path / "manual"
  for label, (cls, count) in enumerate((("negative", 3), ("positive", 2))):
    os.makedirs(manual / "rendered_sst2" / "test" / cls)
    for i in range(count):
      image = np.full((20 + 5 * i, 30, 3), 100 * label + i, np.uint8)
      Image.fromarray(image).save(manual / "rendered_sst2" / "test" / cls / f"{i}.png")
  image_folder.prepare_image_folder("RenderedSST2", tmp_path / "data", manual_dir=manual)
  return tmp_path / "data"


def test_vision_eval_through_the_real_read_path(tmp_path):
  data_dir = _prepared_rendered_sst2(tmp_path)
  task = registry.get("RenderedSST2")
  source = task.open_source(data_dir=data_dir)
  prepare = pipeline.vision_preprocessor(image_size=16)
  batches = list(pipeline.eval_batches(source, prepare=prepare, batch_size=4))
  assert [b["image"].shape for b in batches] == [(4, 16, 16, 3)] * 2
  assert all(b["image"].dtype == np.float32 for b in batches)
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
  for i in range(len(source)):  # the batch holds exactly clip_eval of each record, in order
    expected = preprocess.clip_eval(source[i]["image"], 16)
    np.testing.assert_array_equal(batches[i // 4]["image"][i % 4], expected)
  assert "tensorflow" not in sys.modules


def test_vision_adaptation_under_mock_tfds():
  task = registry.get("MNIST")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = task.open_source()
    prepare = pipeline.vision_preprocessor(image_size=32)
    stream = pipeline.adaptation_batches(source, prepare=prepare, batch_size=4, seed=0, workers=2)
    next(stream)
    batch = next(stream)
    stream.close()
  assert batch["image"].shape == (4, 32, 32, 3) and batch["mask"].tolist() == [1, 1, 1, 1]
  assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
  assert set(pipeline.model_inputs(batch, modality="vision")) == {"image"}


def _custom_task(records, num_classes=2):
  return Task(
    name="custom",
    modality="vision",
    num_classes=num_classes,
    split="test",
    reader=lambda task, split, data_dir: records,
    classnames=("a", "b")[:num_classes],
    templates=("{}",),
  )


@pytest.mark.parametrize(
  "records, problem",
  [
    ([{"image": np.zeros((4, 4, 4), np.uint8), "label": 0}], r"images must be uint8 \(H, W, 1 or 3\)"),
    ([{"image": np.zeros((4, 4), np.uint8), "label": 0}], r"images must be uint8"),
    ([{"image": np.zeros((4, 4, 3), np.uint8)}], r"records lack \['label'\]"),
    ([{"image": np.zeros((4, 4, 3), np.uint8), "label": 5}], r"label 5 outside \[0, 2\)"),
    ([], "is empty"),
  ],
)
def test_mismatched_data_is_reported(records, problem):
  with pytest.raises(DatasetMismatchError, match="Task custom: .*" + problem):
    _custom_task(records).open_source()


def test_eval_max_examples_and_model_inputs():
  batches = list(pipeline.eval_batches(_ListSource(10), prepare=_identity, batch_size=4, max_examples=5))
  assert [b["mask"].sum() for b in batches] == [4, 1]
  with pytest.raises(KeyError, match="a text batch needs 'input_ids'"):
    pipeline.model_inputs(batches[0], modality="text")
  with pytest.raises(ValueError, match="modality"):
    pipeline.model_inputs(batches[0], modality="audio")


def test_missing_dataset_error(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=r"Task DTD: tfds data set 'dtd' is not prepared"):
    registry.get("DTD").open_source(data_dir=tmp_path)
