"""The one registry of tasks: what each task is, where its data lives and how a split is opened.

A `Task` names a data set by its tensorflow-datasets builder and the split the Task Arithmetic /
TALL-Masks papers evaluate on. `task.open_source(split, data_dir)` returns a random-access source
(`len(src)`, `src[i]`), for the built-in tasks read through tfds data sources by `tfds_reader` (array_record;
no TensorFlow at read time; tensorflow_datasets is imported on the first read); its first record is
checked against the task (fields, image dtype/shape, label range):

  vision: src[i] = {"image": uint8 (H, W, C) with C in (1, 3), "label": int}
  text:   src[i] = {"text_a": str, "text_b": str (sentence-pair tasks only), "label": int}

Data sets without a usable tfds builder (GTSRB, FER2013, RenderedSST2, and EuroSAT / RESISC45,
whose papers' test splits tfds does not have) are read from an array_record data set that
`image_folder.prepare_image_folder` builds from an image folder, without TensorFlow; see `IMAGE_FOLDER_LAYOUT`.
Nothing is ever downloaded: a missing data set raises `DatasetNotFoundError` saying how to prepare it.

Registered at import: the paper's 20 vision tasks, the 7 GLUE tasks and the 8 digits tasks of the
embedded demo (`adarank_jax.digits.tasks`, built in memory). Which tasks an experiment runs is
config data (`configs/common.py`: TASKS_8 / TASKS_14 / TASKS_20, GLUE_7).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from adarank_jax.data import vision_tasks

IMAGE_FOLDER_BUILDER = "adarank_image_folder"
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


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  """Adds `task`; a second task with the same name is an error."""
  if task.name in _REGISTRY:
    raise ValueError(f"Task {task.name!r} is already registered")
  _REGISTRY[task.name] = task
  return task


def get(name: str) -> Task:
  """The registered task called `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """All registered task names, in registration order."""
  return tuple(_REGISTRY)


def read_tfds(task: Task, split: str, data_dir: str | None) -> Source:
  """The reader of every built-in task (`tfds_reader.read_tfds`; tensorflow_datasets is imported on the
  first read, not with the registry)."""
  from adarank_jax.data import tfds_reader  # pylint: disable=g-import-not-at-top

  return tfds_reader.read_tfds(task, split, data_dir)


# ---------------------------------------------------------------------------------------------
# The built-in tasks.

_TFDS_HINT = "on a machine with TensorFlow (the [tf] extra): tfds build {name} --data_dir=<data_dir>"
_FOLDER_HINT = (
  "put the images in {layout} with <config>={config}, then run "
  "python -m adarank_jax.data.image_folder --task={task} --data_dir=<data_dir> "
  "(no TensorFlow needed). {source} For selection=validation, also a val/ folder of "
  "labelled images held out of the training data."
)


def _folder(config: str, task: str, source: str) -> tuple[str, str, str, str]:
  hint = _FOLDER_HINT.format(layout=IMAGE_FOLDER_LAYOUT, config=config, task=task, source=source)
  return f"{IMAGE_FOLDER_BUILDER}/{config}", "test", "val", hint


def _tfds(name: str, split: str = "test") -> tuple[str, str, str, str]:
  return name, split, TFDS_VALIDATION, _TFDS_HINT.format(name=name)


TFDS_VALIDATION = "train[90%:]"  # the validation split of the built-in tfds tasks (see Task)
# name -> (tfds builder, split, validation split, how to prepare)
_VISION = {
  "Cars": _tfds("cars196"),
  "DTD": _tfds("dtd"),
  "EuroSAT": _folder(
    "eurosat",
    "EuroSAT",
    (
      "test/: the 2,700 test images of the Task Arithmetic split EuroSAT_splits/{train,val,test} "
      "(21,600/2,700/2,700 images of the EuroSAT RGB zip) in the class folders AnnualCrop..SeaLake."
    ),
  ),
  "GTSRB": _folder(
    "gtsrb",
    "GTSRB",
    (
      "test/: the 12,630 GTSRB_Final_Test_Images moved into class folders 00000..00042 by the ClassId "
      "column of GT-final_test.csv."
    ),
  ),
  "MNIST": _tfds("mnist"),
  "RESISC45": _folder(
    "resisc45",
    "RESISC45",
    (
      "test/: the 6,300 NWPU-RESISC45 images listed in resisc45-test.txt (the google-research "
      "remote_sensing_representations split Task Arithmetic uses) in class folders airplane..wetland."
    ),
  ),
  "SUN397": _tfds("sun397/standard-part1-120k"),
  "SVHN": _tfds("svhn_cropped"),
  "CIFAR100": _tfds("cifar100"),
  "STL10": _tfds("stl10"),
  "Flowers102": _tfds("oxford_flowers102"),
  "OxfordIIITPet": _tfds("oxford_iiit_pet"),
  "PCAM": _tfds("patch_camelyon"),
  "FER2013": _folder(
    "fer2013",
    "FER2013",
    (
      "test/: the 7,178 FER2013 test images (TALL-Masks reads HF Jeneral/fer-2013, split test) in class "
      "folders 0..6 = angry, disgust, fear, happy, sad, surprise, neutral."
    ),
  ),
  "EMNIST": _tfds("emnist/digits"),
  "CIFAR10": _tfds("cifar10"),
  "Food101": _tfds("food101", "validation"),
  "FashionMNIST": _tfds("fashion_mnist"),
  "RenderedSST2": _folder(
    "rendered_sst2",
    "RenderedSST2",
    ("test/: the 1,821 images of rendered-sst2.tgz test/ (class folders negative, positive)."),
  ),
  "KMNIST": _tfds("kmnist"),
}

# name -> (tfds config, split, num_classes, text fields)
_GLUE = {
  "cola": ("cola", "validation", 2, ("sentence",)),
  "sst2": ("sst2", "validation", 2, ("sentence",)),
  "mrpc": ("mrpc", "validation", 2, ("sentence1", "sentence2")),
  "qqp": ("qqp", "validation", 2, ("question1", "question2")),
  "mnli": ("mnli", "validation_matched", 3, ("premise", "hypothesis")),
  "qnli": ("qnli", "validation", 2, ("question", "sentence")),
  "rte": ("rte", "validation", 2, ("sentence1", "sentence2")),
}


def _register_builtin() -> None:
  for name, (tfds_name, split, validation_split, hint) in _VISION.items():
    classnames = vision_tasks.CLASSNAMES[name]
    register(
      Task(
        name=name,
        modality="vision",
        num_classes=len(classnames),
        split=split,
        validation_split=validation_split,
        reader=read_tfds,
        tfds_name=tfds_name,
        classnames=classnames,
        templates=vision_tasks.TEMPLATES[name],
        prepare=hint,
      )
    )
  for name, (config, split, num_classes, fields) in _GLUE.items():
    register(
      Task(
        name=name,
        modality="text",
        num_classes=num_classes,
        split=split,
        validation_split=TFDS_VALIDATION,
        reader=read_tfds,
        tfds_name=f"glue/{config}",
        metric="matthews" if name == "cola" else "accuracy",
        text_fields=fields,
        prepare=_TFDS_HINT.format(name=f"glue/{config}"),
      )
    )


_register_builtin()
# The digits tasks (their module imports this one: by now every name above is defined).
from adarank_jax.digits import tasks as _digits_tasks  # noqa: E402  pylint: disable=g-import-not-at-top

_digits_tasks.register_tasks()
