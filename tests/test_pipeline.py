"""Tests for adarank_jax.data.pipeline: fixed-shape padded batches, prefetching, resumable streams."""

import os
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from adarank_jax.data import image_folder, pipeline, preprocess, registry


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


def _stream(n=10, batch_size=4, seed=0):
  return pipeline.AdaptationStream(
    _ListSource(n), prepare=_identity, batch_size=batch_size, seed=seed, workers=2
  )


def _ids(batch):
  return batch["x"][:, 0].astype(int).tolist()


def test_adaptation_stream_epochs_are_seeded_permutations():
  stream = _stream(n=12, batch_size=4, seed=3)
  first_epoch = sum((_ids(next(stream)) for _ in range(3)), [])
  second_epoch = sum((_ids(next(stream)) for _ in range(3)), [])
  assert sorted(first_epoch) == list(range(12)) and sorted(second_epoch) == list(range(12))
  assert first_epoch != second_epoch  # reshuffled per epoch
  assert first_epoch == pipeline.epoch_permutation(12, 3, 0).tolist()
  assert stream.position == {"epoch": 2, "index": 0}
  other = _stream(n=12, batch_size=4, seed=4)
  assert sum((_ids(next(other)) for _ in range(3)), []) != first_epoch
  stream.close()
  other.close()


def test_adaptation_batches_are_full_across_epoch_boundaries():
  stream = _stream(n=10, batch_size=4)
  batches = [next(stream) for _ in range(5)]  # 20 examples = 2 epochs
  assert all(b["mask"].sum() == 4 for b in batches)
  ids = sum((_ids(b) for b in batches), [])
  assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:]) == list(range(10))
  assert stream.position == {"epoch": 2, "index": 0}
  stream.close()


def test_position_restore_reproduces_the_stream():
  stream = _stream(n=10, batch_size=4, seed=7)
  for _ in range(3):
    next(stream)
  saved = dict(stream.position)
  assert saved == {"epoch": 1, "index": 2}
  expected = [_ids(next(stream)) for _ in range(4)]
  resumed = _stream(n=10, batch_size=4, seed=7)
  resumed.restore(saved)
  assert [_ids(next(resumed)) for _ in range(4)] == expected
  stream.restore(saved)  # the same stream rewinds, dropping what it had prefetched
  assert [_ids(next(stream)) for _ in range(4)] == expected
  for bad in ({"epoch": 0}, {"epoch": 0, "index": 10}, {"epoch": -1, "index": 0}):
    with pytest.raises(ValueError, match="position"):
      resumed.restore(bad)
  stream.close()
  resumed.close()


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
    stream = pipeline.adaptation_stream(
      source, prepare=prepare, batch_size=4, seed=0, start_batch=1, workers=2
    )
    assert stream.position == {"epoch": 0, "index": 4}
    batch = next(stream)
    stream.close()
  assert batch["image"].shape == (4, 32, 32, 3) and batch["mask"].tolist() == [1, 1, 1, 1]
  assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
  assert set(pipeline.model_inputs(batch, kind="vision")) == {"image"}


def _custom_task(records, num_classes=2):
  return registry.Task(
    name="custom",
    kind="vision",
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
  with pytest.raises(registry.DatasetMismatchError, match="Task custom: .*" + problem):
    _custom_task(records).open_source()


def test_eval_max_examples_and_model_inputs():
  batches = list(pipeline.eval_batches(_ListSource(10), prepare=_identity, batch_size=4, max_examples=5))
  assert [b["mask"].sum() for b in batches] == [4, 1]
  with pytest.raises(KeyError, match="a text batch needs 'input_ids'"):
    pipeline.model_inputs(batches[0], kind="text")
  with pytest.raises(ValueError, match="kind"):
    pipeline.model_inputs(batches[0], kind="audio")


def test_adaptation_stream_start_batch_matches_a_consumed_stream():
  stream = _stream(n=10, batch_size=4, seed=5)
  for _ in range(3):
    next(stream)
  expected = _ids(next(stream))
  started = pipeline.adaptation_stream(
    _ListSource(10), prepare=_identity, batch_size=4, seed=5, start_batch=3, workers=2
  )
  assert started.position == {"epoch": 1, "index": 2} and _ids(next(started)) == expected
  stream.close()
  started.close()


def test_missing_dataset_error(tmp_path):
  with pytest.raises(registry.DatasetNotFoundError, match=r"Task DTD: tfds data set 'dtd' is not prepared"):
    registry.get("DTD").open_source(data_dir=tmp_path)
