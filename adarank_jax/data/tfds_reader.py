"""Reading a registered task's split through tfds data sources (array_record; no TensorFlow at read time).

`read_tfds(task, split, data_dir)` is the reader of every built-in task (`registry.Task.reader`): it opens
`task.tfds_name` with `builder.as_data_source(split)` (tfds split slicing such as "train[90%:]" works),
checks the features against the task, and wraps the raw records as `ImageSource` / `TextSource`. Nothing
is downloaded: a missing or unprepared data set is a `registry.DatasetNotFoundError` that says how to
prepare it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.text import glue as _tfds_glue  # noqa: F401  (registers the glue/* builders)

from adarank_jax.data import image_folder  # noqa: F401  (registers the image-folder builder with tfds)
from adarank_jax.data.task import DatasetMismatchError, DatasetNotFoundError, Source, Task


def _open_builder(task: Task, data_dir: str | None):
  """The tfds builder of `task`; a name tfds cannot resolve is a DatasetNotFoundError."""
  try:
    return tfds.builder(task.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
      f"Task {task.name}: no tfds builder or prepared data set {task.tfds_name!r} under "
      f"data_dir={data_dir!r} (nothing is downloaded). To prepare it: {task.prepare}"
    ) from e


def _check_features(task: Task, builder) -> None:
  features = builder.info.features
  wanted = ("label",) + (task.text_fields if task.modality == "text" else ())
  missing = [f for f in wanted if f not in features]
  if missing:
    raise DatasetMismatchError(
      f"Task {task.name}: {task.tfds_name} in {builder.data_dir} lacks features "
      f"{missing} (features: {sorted(features)})"
    )
  found = features["label"].num_classes
  if found != task.num_classes:
    raise DatasetMismatchError(
      f"Task {task.name}: {task.tfds_name} in {builder.data_dir} has {found} "
      f"classes, the registry expects {task.num_classes}"
    )


def read_tfds(task: Task, split: str, data_dir: str | None) -> Source:
  """The reader of every built-in task: `task.tfds_name` through `builder.as_data_source`."""
  builder = _open_builder(task, data_dir)
  _check_features(task, builder)
  try:
    raw = builder.as_data_source(split=split)
  except (ValueError, KeyError, NotImplementedError) as e:
    if not builder.is_prepared():
      raise DatasetNotFoundError(
        f"Task {task.name}: tfds data set {task.tfds_name!r} is not prepared in {builder.data_dir} "
        f"(searched data_dir={data_dir!r}; nothing is downloaded). To prepare it: {task.prepare}"
      ) from e
    raise DatasetNotFoundError(
      f"Task {task.name}: cannot open split {split!r} of {task.tfds_name} in {builder.data_dir} as an "
      f"array_record data source ({type(e).__name__}: {e}); prepared splits: "
      f"{sorted(builder.info.splits)}; prepare with --file_format=array_record if it holds tfrecord "
      f"files"
    ) from e
  return TextSource(raw, task) if task.modality == "text" else ImageSource(raw, task)


def decode_image(record: dict[str, Any]) -> np.ndarray:
  """uint8 (H, W, C) from a record's "image" array or encoded "image_bytes" (C = 1 for grey, else 3)."""
  if "image" in record:
    return np.asarray(record["image"])
  image = Image.open(io.BytesIO(record["image_bytes"]))
  image = image if image.mode in ("L", "RGB") else image.convert("RGB")
  array = np.asarray(image, dtype=np.uint8)
  return array[:, :, None] if array.ndim == 2 else array


class ImageSource:
  """Vision records {"image": uint8 (H, W, C), "label": int} over a raw tfds source."""

  def __init__(self, raw: Sequence[dict[str, Any]], task: Task):
    self.raw, self.task = raw, task

  def __len__(self) -> int:
    return len(self.raw)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.raw[index]
    image = decode_image(record)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise DatasetMismatchError(
        f"Task {self.task.name}: example {index} image has dtype {image.dtype} "
        f"shape {image.shape}; expected uint8 (H, W, 1 or 3)"
      )
    return {"image": image, "label": int(record["label"])}


class TextSource:
  """Text records {"text_a": str[, "text_b": str], "label": int} over a raw tfds source."""

  def __init__(self, raw: Sequence[dict[str, Any]], task: Task):
    self.raw, self.task = raw, task

  def __len__(self) -> int:
    return len(self.raw)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.raw[index]
    texts = [record[f] for f in self.task.text_fields]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    return {**dict(zip(("text_a", "text_b"), texts)), "label": int(record["label"])}
