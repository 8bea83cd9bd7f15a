"""The one registry of tasks: what each task is, where its data lives and how a split is opened.

A `Task` names a data set by its tensorflow-datasets builder and the split the Task Arithmetic /
TALL-Masks papers evaluate on. `task.open_source(split, data_dir)` returns a random-access source
(`len(src)`, `src[i]`) read through tfds data sources (array_record; no TensorFlow at read time); its
first record is checked against the task (fields, image dtype/shape, label range):

  vision: src[i] = {"image": uint8 (H, W, C) with C in (1, 3), "label": int}
  text:   src[i] = {"text_a": str, "text_b": str (sentence-pair tasks only), "label": int}

Data sets without a usable tfds builder (GTSRB, FER2013, RenderedSST2, and EuroSAT / RESISC45,
whose papers' test splits tfds does not have) are read from an array_record data set that
`prepare_image_folder` builds from an image folder, without TensorFlow; see `IMAGE_FOLDER_LAYOUT`.
Nothing is ever downloaded: a missing data set raises `DatasetNotFoundError` saying how to prepare it.

Registered at import: the paper's 20 vision tasks, the 7 GLUE tasks and the 8 digits tasks of the
embedded demo (`adarank_jax.digits.tasks`, built in memory). Which tasks an experiment runs is
config data (`configs/common.py`: TASKS_8 / TASKS_14 / TASKS_20, GLUE_7).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.text import glue as _tfds_glue  # noqa: F401  (registers the glue/* builders)

from adarank_jax.data import vision_tasks

IMAGE_FOLDER_BUILDER = "adarank_image_folder"
IMAGE_FOLDER_LAYOUT = (
    "<manual_dir>/<config>/<split>/<class folder>/<image file>; class folders sort (as strings) into "
    "label order, as torchvision.datasets.ImageFolder does; <manual_dir> defaults to "
    "<data_dir>/downloads/manual")


class DatasetNotFoundError(FileNotFoundError):
  """A task's data set (or split) is not prepared under the data_dir searched."""


class DatasetMismatchError(ValueError):
  """A prepared data set disagrees with its registry entry (classes, image shape, fields)."""


class Source(Protocol):
  """A random-access view of one split."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


Reader = Callable[["Task", str, "str | None"], Source]


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task.

  Attributes:
    name: registry key ("SUN397", "cola", ...).
    kind: "vision" or "text".
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
  kind: str
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
    if self.kind not in ("vision", "text"):
      raise ValueError(f"Task {self.name}: kind must be 'vision' or 'text', got {self.kind!r}")
    if self.metric not in ("accuracy", "matthews"):
      raise ValueError(f"Task {self.name}: metric must be 'accuracy' or 'matthews', got {self.metric!r}")
    if self.kind == "vision":
      if len(self.classnames) != self.num_classes:
        raise ValueError(
            f"Task {self.name}: {len(self.classnames)} classnames for num_classes={self.num_classes}")
      if not self.templates or any(t.count("{}") != 1 for t in self.templates):
        raise ValueError(f"Task {self.name}: templates must be non-empty, each with exactly one '{{}}'")
    elif len(self.text_fields) not in (1, 2):
      raise ValueError(f"Task {self.name}: text tasks need 1 or 2 text_fields, got {self.text_fields}")

  def open_source(self, split: str | None = None,
                  data_dir: str | os.PathLike[str] | None = None) -> Source:
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
  wanted = ("image", "label") if task.kind == "vision" else ("text_a", "label")
  missing = [k for k in wanted if k not in first]
  if missing:
    raise DatasetMismatchError(f"Task {task.name}: records lack {missing}; got keys {sorted(first)}")
  if task.kind == "vision":
    image = np.asarray(first["image"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise DatasetMismatchError(f"Task {task.name}: images must be uint8 (H, W, 1 or 3), got dtype "
                                 f"{image.dtype} shape {image.shape}")
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


# ---------------------------------------------------------------------------------------------
# Reading through tfds data sources.


def _open_builder(task: Task, data_dir: str | None):
  """The tfds builder of `task`; a name tfds cannot resolve is a DatasetNotFoundError."""
  try:
    return tfds.builder(task.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"Task {task.name}: no tfds builder or prepared data set {task.tfds_name!r} under "
        f"data_dir={data_dir!r} (nothing is downloaded). To prepare it: {task.prepare}") from e


def _check_features(task: Task, builder) -> None:
  features = builder.info.features
  wanted = ("label",) + (task.text_fields if task.kind == "text" else ())
  missing = [f for f in wanted if f not in features]
  if missing:
    raise DatasetMismatchError(f"Task {task.name}: {task.tfds_name} in {builder.data_dir} lacks features "
                               f"{missing} (features: {sorted(features)})")
  found = features["label"].num_classes
  if found != task.num_classes:
    raise DatasetMismatchError(f"Task {task.name}: {task.tfds_name} in {builder.data_dir} has {found} "
                               f"classes, the registry expects {task.num_classes}")


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
          f"(searched data_dir={data_dir!r}; nothing is downloaded). To prepare it: {task.prepare}") from e
    raise DatasetNotFoundError(
        f"Task {task.name}: cannot open split {split!r} of {task.tfds_name} in {builder.data_dir} as an "
        f"array_record data source ({type(e).__name__}: {e}); prepared splits: "
        f"{sorted(builder.info.splits)}; prepare with --file_format=array_record if it holds tfrecord "
        f"files") from e
  return TextSource(raw, task) if task.kind == "text" else ImageSource(raw, task)


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
      raise DatasetMismatchError(f"Task {self.task.name}: example {index} image has dtype {image.dtype} "
                                 f"shape {image.shape}; expected uint8 (H, W, 1 or 3)")
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


# ---------------------------------------------------------------------------------------------
# Image folders -> array_record, without TensorFlow (encoded file bytes; decoded with PIL on read).


# builder config -> task
_FOLDER_TASKS = {"eurosat": "EuroSAT", "gtsrb": "GTSRB", "resisc45": "RESISC45", "fer2013": "FER2013",
                 "rendered_sst2": "RenderedSST2"}


class AdarankImageFolder(tfds.core.GeneratorBasedBuilder):
  """Image-folder tasks stored as encoded bytes + label; one builder config per task."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"{task} from an image folder")
                     for name, task in _FOLDER_TASKS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Layout: {IMAGE_FOLDER_LAYOUT}"

  def _num_classes(self) -> int:
    return get(_FOLDER_TASKS[self.builder_config.name]).num_classes

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(num_classes=self._num_classes()),
            "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        description=self.builder_config.description)

  def _split_generators(self, dl_manager):
    root = os.path.join(dl_manager.manual_dir, self.builder_config.name)
    if not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"{self.builder_config.name}: no folder {root}; layout: {IMAGE_FOLDER_LAYOUT}")
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return {split: self._generate_examples(os.path.join(root, split)) for split in splits}

  def _generate_examples(self, split_dir: str):
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if len(classes) != self._num_classes():
      raise DatasetMismatchError(f"{split_dir}: {len(classes)} class folders, expected {self._num_classes()}")
    for label, class_dir in enumerate(classes):
      for file_name in sorted(os.listdir(os.path.join(split_dir, class_dir))):
        path = os.path.join(split_dir, class_dir, file_name)
        with open(path, "rb") as f:
          data = f.read()
        key = f"{class_dir}/{file_name}"
        yield key, {"image_bytes": data, "label": label, "file_name": key}


def prepare_image_folder(task_name: str, data_dir: str | os.PathLike[str],
                         manual_dir: str | os.PathLike[str] | None = None) -> None:
  """Builds the array_record data set of an image-folder task (no TensorFlow needed).

  Args:
    task_name: one of EuroSAT, GTSRB, RESISC45, FER2013, RenderedSST2.
    data_dir: the tfds data_dir the run reads from.
    manual_dir: folder holding <config>/<split>/<class>/<files>; default <data_dir>/downloads/manual.
  """
  task = get(task_name)
  config = task.tfds_name.partition("/")[2]
  if not task.tfds_name.startswith(IMAGE_FOLDER_BUILDER + "/"):
    raise ValueError(f"Task {task_name} is not an image-folder task (tfds name {task.tfds_name!r}); "
                     f"image-folder tasks: {sorted(_FOLDER_TASKS.values())}")
  builder = AdarankImageFolder(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  manual_dir = None if manual_dir is None else os.fspath(manual_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=download_config)


# ---------------------------------------------------------------------------------------------
# The built-in tasks.

_TFDS_HINT = "on a machine with TensorFlow (the [tf] extra): tfds build {name} --data_dir=<data_dir>"
_FOLDER_HINT = ("put the images in {layout} with <config>={config}, then run "
                "python -m adarank_jax.data.registry --task={task} --data_dir=<data_dir> "
                "(no TensorFlow needed). {source} For selection=validation, also a val/ folder of "
                "labelled images held out of the training data.")


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
    "EuroSAT": _folder("eurosat", "EuroSAT", (
        "test/: the 2,700 test images of the Task Arithmetic split EuroSAT_splits/{train,val,test} "
        "(21,600/2,700/2,700 images of the EuroSAT RGB zip) in the class folders AnnualCrop..SeaLake.")),
    "GTSRB": _folder("gtsrb", "GTSRB", (
        "test/: the 12,630 GTSRB_Final_Test_Images moved into class folders 00000..00042 by the ClassId "
        "column of GT-final_test.csv.")),
    "MNIST": _tfds("mnist"),
    "RESISC45": _folder("resisc45", "RESISC45", (
        "test/: the 6,300 NWPU-RESISC45 images listed in resisc45-test.txt (the google-research "
        "remote_sensing_representations split Task Arithmetic uses) in class folders airplane..wetland.")),
    "SUN397": _tfds("sun397/standard-part1-120k"),
    "SVHN": _tfds("svhn_cropped"),
    "CIFAR100": _tfds("cifar100"),
    "STL10": _tfds("stl10"),
    "Flowers102": _tfds("oxford_flowers102"),
    "OxfordIIITPet": _tfds("oxford_iiit_pet"),
    "PCAM": _tfds("patch_camelyon"),
    "FER2013": _folder("fer2013", "FER2013", (
        "test/: the 7,178 FER2013 test images (TALL-Masks reads HF Jeneral/fer-2013, split test) in class "
        "folders 0..6 = angry, disgust, fear, happy, sad, surprise, neutral.")),
    "EMNIST": _tfds("emnist/digits"),
    "CIFAR10": _tfds("cifar10"),
    "Food101": _tfds("food101", "validation"),
    "FashionMNIST": _tfds("fashion_mnist"),
    "RenderedSST2": _folder("rendered_sst2", "RenderedSST2", (
        "test/: the 1,821 images of rendered-sst2.tgz test/ (class folders negative, positive).")),
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
    register(Task(name=name, kind="vision", num_classes=len(classnames), split=split,
                  validation_split=validation_split, reader=read_tfds,
                  tfds_name=tfds_name, classnames=classnames, templates=vision_tasks.TEMPLATES[name],
                  prepare=hint))
  for name, (config, split, num_classes, fields) in _GLUE.items():
    register(Task(name=name, kind="text", num_classes=num_classes, split=split,
                  validation_split=TFDS_VALIDATION, reader=read_tfds,
                  tfds_name=f"glue/{config}", metric="matthews" if name == "cola" else "accuracy",
                  text_fields=fields, prepare=_TFDS_HINT.format(name=f"glue/{config}")))


_register_builtin()
# The digits tasks (their module imports this one: by now every name above is defined).
from adarank_jax.digits import tasks as _digits_tasks  # noqa: E402  pylint: disable=g-import-not-at-top

_digits_tasks.register_tasks()


def main(argv: Sequence[str]) -> None:
  """python -m adarank_jax.data.registry --task=GTSRB --data_dir=DIR [--manual_dir=DIR]."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  prepare_image_folder(flags.FLAGS.task, flags.FLAGS.data_dir, flags.FLAGS.manual_dir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("task", None, "image-folder task to prepare", required=True)
  flags.DEFINE_string("data_dir", None, "tfds data_dir to write", required=True)
  flags.DEFINE_string("manual_dir", None, "folder with <config>/<split>/<class>/<files>")
  app.run(main)
