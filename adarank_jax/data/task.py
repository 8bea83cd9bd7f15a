"""What a task is and what reading one returns: the `Task` record, the random-access `Source` of a split,
and the errors of reading. The bottom of `adarank_jax.data`: it imports no reader and no registry.

`task.open_source(split, data_dir)` calls the task's reader and checks the first record against the task
(fields, image dtype/shape, label range):

  vision: src[i] = {"image": uint8 (H, W, C) with C in (1, 3), "label": int}
  text:   src[i] = {"text_a": str, "text_b": str (sentence-pair tasks only), "label": int}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

IMAGE_FOLDER_BUILDER = "adarank_image_folder"
# The image-folder tasks (those without a usable tfds builder): builder config -> task name.
IMAGE_FOLDER_TASKS = {
  "eurosat": "EuroSAT",
  "gtsrb": "GTSRB",
  "resisc45": "RESISC45",
  "fer2013": "FER2013",
  "rendered_sst2": "RenderedSST2",
}
IMAGE_FOLDER_LAYOUT = (
  "<manual_dir>/<config>/<split>/<class folder>/<image file>; class folders sort (as strings) into "
  "label order, as torchvision.datasets.ImageFolder does; <manual_dir> defaults to "
  "<data_dir>/downloads/manual"
)


class DatasetNotFoundError(FileNotFoundError):
  """A task's data set (or split) is not prepared under the data_dir searched."""


class DatasetMismatchError(ValueError):
  """A prepared data set disagrees with its registry entry (classes, image shape, fields)."""


class Source(Protocol):
  """A random-access view of one split."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


Reader = Callable[["Task", str, "str | None"], Source]


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task.

  Attributes:
    name: registry key ("SUN397", "cola", ...).
    modality: "vision" or "text".
    num_classes: number of labels.
    split: the split the papers evaluate (and adapt) on, a tfds split string.
    validation_split: the labelled split that selection=validation scores, held out of the task's
      training data; "" if the task has none. Built-in tfds tasks: the last 10% of "train" (tfds
      slicing, "train[90%:]"); image-folder tasks: an optional "val" folder (EuroSAT's Task
      Arithmetic split has one). Caveat: the public fine-tuned checkpoints were trained on their own
      random 90% of "train", so most of these examples were seen in fine-tuning; the selection
      still never reads a test label, but its validation scores run high.
    reader: `reader(task, split, data_dir) -> Source`; `read_tfds` for every built-in task.
    tfds_name: "builder/config" that `read_tfds` opens ("" for other readers).
    classnames: vision: class names in label order, as the reference code writes them.
    templates: vision: prompt patterns with one "{}" for the class name.
    metric: "accuracy" or "matthews".
    text_fields: text: the tfds feature names of (text_a[, text_b]).
    prepare: how to prepare the data set; quoted by DatasetNotFoundError.
  """

  name: str
  modality: str
  num_classes: int
  split: str
  reader: Reader
  validation_split: str = ""
  tfds_name: str = ""
  classnames: tuple[str, ...] = ()
  templates: tuple[str, ...] = ()
  metric: str = "accuracy"
  text_fields: tuple[str, ...] = ()
  prepare: str = ""

  def __post_init__(self):
    if self.modality not in ("vision", "text"):
      raise ValueError(f"Task {self.name}: modality must be 'vision' or 'text', got {self.modality!r}")
    if self.metric not in ("accuracy", "matthews"):
      raise ValueError(f"Task {self.name}: metric must be 'accuracy' or 'matthews', got {self.metric!r}")
    if self.modality == "vision":
      if len(self.classnames) != self.num_classes:
        raise ValueError(
          f"Task {self.name}: {len(self.classnames)} classnames for num_classes={self.num_classes}"
        )
      if not self.templates or any(t.count("{}") != 1 for t in self.templates):
        raise ValueError(f"Task {self.name}: templates must be non-empty, each with exactly one '{{}}'")
    elif len(self.text_fields) not in (1, 2):
      raise ValueError(f"Task {self.name}: text tasks need 1 or 2 text_fields, got {self.text_fields}")

  def open_source(self, split: str | None = None, data_dir: str | os.PathLike[str] | None = None) -> Source:
    """Opens `split` (default: the task's evaluation split) as a random-access source."""
    split = self.split if split is None else split
    source = self.reader(self, split, None if data_dir is None else os.fspath(data_dir))
    _check_first_record(self, split, source)
    return source


def _check_first_record(task: Task, split: str, source: Source) -> None:
  """An empty split, missing fields, a bad image or an out-of-range label is a DatasetMismatchError."""
  if len(source) == 0:
    raise DatasetMismatchError(f"Task {task.name}: split {split!r} is empty")
  first = source[0]
  wanted = ("image", "label") if task.modality == "vision" else ("text_a", "label")
  missing = [k for k in wanted if k not in first]
  if missing:
    raise DatasetMismatchError(f"Task {task.name}: records lack {missing}; got keys {sorted(first)}")
  if task.modality == "vision":
    image = np.asarray(first["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise DatasetMismatchError(
        f"Task {task.name}: images must be uint8 (H, W, 1 or 3), got dtype {image.dtype} shape {image.shape}"
      )
  if not 0 <= int(first["label"]) < task.num_classes:
    raise DatasetMismatchError(f"Task {task.name}: label {first['label']} outside [0, {task.num_classes})")
