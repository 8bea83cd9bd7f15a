"""Image-folder data sets -> array_record tfds data sets, without TensorFlow (the data-set preparation tool).

For the tasks without a usable tfds builder (EuroSAT, GTSRB, RESISC45, FER2013, RenderedSST2; see
`task.IMAGE_FOLDER_LAYOUT`): the encoded image files and their labels are stored as they are and
decoded with PIL on read (`tfds_reader`).

  python -m adarank_jax.data.image_folder --task=GTSRB --data_dir=DIR [--manual_dir=DIR]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from adarank_jax.data import vision_tasks
from adarank_jax.data.task import (
  IMAGE_FOLDER_BUILDER,
  IMAGE_FOLDER_LAYOUT,
  IMAGE_FOLDER_TASKS,
  DatasetMismatchError,
  DatasetNotFoundError,
)


class AdarankImageFolder(tfds.core.GeneratorBasedBuilder):
  """Image-folder tasks stored as encoded bytes + label; one builder config per task."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=name, description=f"{task} from an image folder")
    for name, task in IMAGE_FOLDER_TASKS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Layout: {IMAGE_FOLDER_LAYOUT}"

  def _num_classes(self) -> int:
    return len(vision_tasks.CLASSNAMES[IMAGE_FOLDER_TASKS[self.builder_config.name]])

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
          "label": tfds.features.ClassLabel(num_classes=self._num_classes()),
          "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
        }
      ),
      description=self.builder_config.description,
    )

  def _split_generators(self, dl_manager):
    root = os.path.join(dl_manager.manual_dir, self.builder_config.name)
    if not os.path.isdir(root):
      raise DatasetNotFoundError(
        f"{self.builder_config.name}: no folder {root}; layout: {IMAGE_FOLDER_LAYOUT}"
      )
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


def prepare_image_folder(
  task_name: str, data_dir: str | os.PathLike[str], manual_dir: str | os.PathLike[str] | None = None
) -> None:
  """Builds the array_record data set of an image-folder task (no TensorFlow needed).

  Args:
    task_name: one of EuroSAT, GTSRB, RESISC45, FER2013, RenderedSST2.
    data_dir: the tfds data_dir the run reads from.
    manual_dir: folder holding <config>/<split>/<class>/<files>; default <data_dir>/downloads/manual.
  """
  config = next((c for c, task in IMAGE_FOLDER_TASKS.items() if task == task_name), None)
  if config is None:
    raise ValueError(
      f"Task {task_name} is not an image-folder task ({IMAGE_FOLDER_BUILDER}/<config>); "
      f"image-folder tasks: {sorted(IMAGE_FOLDER_TASKS.values())}"
    )
  builder = AdarankImageFolder(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  manual_dir = None if manual_dir is None else os.fspath(manual_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=download_config)


def main(argv: Sequence[str]) -> None:
  """python -m adarank_jax.data.image_folder --task=GTSRB --data_dir=DIR [--manual_dir=DIR]."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  prepare_image_folder(flags.FLAGS.task, flags.FLAGS.data_dir, flags.FLAGS.manual_dir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("task", None, "image-folder task to prepare", required=True)
  flags.DEFINE_string("data_dir", None, "tfds data_dir to write", required=True)
  flags.DEFINE_string("manual_dir", None, "folder with <config>/<split>/<class>/<files>")
  app.run(main)
