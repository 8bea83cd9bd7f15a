"""The one registry of tasks: the built-in tasks by name, and `register` for a user's own.

Each entry is a `Task` (`data/task.py`): it names a data set by its tensorflow-datasets builder and the
split the Task Arithmetic / TALL-Masks papers evaluate on. `task.open_source(split, data_dir)` returns a
random-access source, for the built-in tasks read through tfds data sources by `tfds_reader`
(array_record; no TensorFlow at read time; tensorflow_datasets is imported on the first read).

Data sets without a usable tfds builder (GTSRB, FER2013, RenderedSST2, and EuroSAT / RESISC45,
whose papers' test splits tfds does not have) are read from an array_record data set that
`image_folder.prepare_image_folder` builds from an image folder, without TensorFlow; see `IMAGE_FOLDER_LAYOUT`.
Nothing is ever downloaded: a missing data set raises `DatasetNotFoundError` saying how to prepare it.

Registered at import: the paper's 20 vision tasks, the 7 GLUE tasks and the 8 digits tasks of the
embedded demo (`data/digits.py`, built in memory). Which tasks an experiment runs is
config data (`configs/common.py`: TASKS_8 / TASKS_14 / TASKS_20, GLUE_7).
"""

from __future__ import annotations

from adarank_jax.data import digits as digits_tasks
from adarank_jax.data import vision_tasks
from adarank_jax.data.task import IMAGE_FOLDER_BUILDER, IMAGE_FOLDER_LAYOUT, IMAGE_FOLDER_TASKS, Source, Task

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


def _folder(config: str, source: str) -> tuple[str, str, str, str]:
  task = IMAGE_FOLDER_TASKS[config]
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
    (
      "test/: the 2,700 test images of the Task Arithmetic split EuroSAT_splits/{train,val,test} "
      "(21,600/2,700/2,700 images of the EuroSAT RGB zip) in the class folders AnnualCrop..SeaLake."
    ),
  ),
  "GTSRB": _folder(
    "gtsrb",
    (
      "test/: the 12,630 GTSRB_Final_Test_Images moved into class folders 00000..00042 by the ClassId "
      "column of GT-final_test.csv."
    ),
  ),
  "MNIST": _tfds("mnist"),
  "RESISC45": _folder(
    "resisc45",
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
  for task in digits_tasks.entries():  # the embedded demo's tasks, built in memory
    register(task)


_register_builtin()
