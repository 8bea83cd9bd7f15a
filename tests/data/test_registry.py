"""Tests for adarank_jax.data.registry and vision_tasks: task lists, class names, templates, tfds sources."""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from adarank_jax.data import (
  image_folder,
  registry,
  tfds_reader,  # noqa: F401  (registers the glue/* builders with tfds)
  vision_tasks,
)
from adarank_jax.data.task import IMAGE_FOLDER_BUILDER, DatasetMismatchError, DatasetNotFoundError, Task
from configs import common

_NUM_CLASSES = {
  "Cars": 196,
  "DTD": 47,
  "EuroSAT": 10,
  "GTSRB": 43,
  "MNIST": 10,
  "RESISC45": 45,
  "SUN397": 397,
  "SVHN": 10,
  "CIFAR100": 100,
  "STL10": 10,
  "Flowers102": 102,
  "OxfordIIITPet": 37,
  "PCAM": 2,
  "FER2013": 7,
  "EMNIST": 10,
  "CIFAR10": 10,
  "Food101": 101,
  "FashionMNIST": 10,
  "RenderedSST2": 2,
  "KMNIST": 10,
  "cola": 2,
  "sst2": 2,
  "mrpc": 2,
  "qqp": 2,
  "mnli": 3,
  "qnli": 2,
  "rte": 2,
}
# Number of templates per task in task_vectors / tall_masks src/datasets/templates.py.
_NUM_TEMPLATES = {
  "Cars": 8,
  "DTD": 8,
  "EuroSAT": 3,
  "GTSRB": 3,
  "MNIST": 1,
  "RESISC45": 18,
  "SUN397": 2,
  "SVHN": 1,
  "CIFAR100": 18,
  "STL10": 2,
  "Flowers102": 1,
  "OxfordIIITPet": 1,
  "PCAM": 1,
  "FER2013": 6,
  "EMNIST": 1,
  "CIFAR10": 18,
  "Food101": 1,
  "FashionMNIST": 2,
  "RenderedSST2": 1,
  "KMNIST": 1,
}


def _tfds_label_names(name):
  return list(tfds.builder(name, data_dir="/nonexistent/tfds").info.features["label"].names)


def test_task_lists():
  assert len(common.TASKS_8) == 8 and len(common.TASKS_14) == 14 and len(common.TASKS_20) == 20
  assert common.TASKS_14[:8] == common.TASKS_8 and common.TASKS_20[:14] == common.TASKS_14
  assert len(set(common.TASKS_20)) == 20
  assert common.GLUE_7 == ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte")
  assert set(registry.names()) >= set(common.TASKS_20) | set(common.GLUE_7) | set(common.DIGITS_8)


@pytest.mark.parametrize("name", sorted(_NUM_CLASSES))
def test_class_and_template_counts(name):
  task = registry.get(name)
  assert task.num_classes == _NUM_CLASSES[name]
  if task.modality == "vision":
    assert len(task.classnames) == task.num_classes == len(set(task.classnames))
    assert len(task.templates) == _NUM_TEMPLATES[name]
    assert all(t.count("{}") == 1 for t in task.templates)


def test_metrics_and_splits():
  assert registry.get("cola").metric == "matthews"
  assert all(registry.get(n).metric == "accuracy" for n in common.GLUE_7[1:] + common.TASKS_20)
  assert registry.get("mnli").split == "validation_matched"
  assert registry.get("Food101").split == "validation"
  assert registry.get("EMNIST").tfds_name == "emnist/digits"
  assert registry.get("SVHN").tfds_name == "svhn_cropped"
  assert registry.get("mrpc").text_fields == ("sentence1", "sentence2")


def test_reference_strings():
  t = vision_tasks.TEMPLATES
  assert t["GTSRB"][0].format("stop") == 'a zoomed in photo of a "stop" traffic sign.'
  assert t["MNIST"] == ('a photo of the number: "{}".',)
  assert t["PCAM"] == ("this is a photo of {}",)
  assert t["RESISC45"][:2] == ("satellite imagery of {}.", "aerial imagery of {}.")
  c = vision_tasks.CLASSNAMES
  assert c["SUN397"][:3] == ("abbey", "airplane cabin", "airport terminal")
  assert c["SUN397"][-1] == "youth hostel" and c["SUN397"][206:208] == ("jail indoor", "jail cell")
  assert "apartment building outdoor" in c["SUN397"] and "wine cellar barrel storage" in c["SUN397"]
  assert c["EuroSAT"][2] == "brushland or shrubland" and c["EuroSAT"][-1] == "lake or sea"
  assert c["FER2013"][3] == "['happy', 'smiling']"  # the reference formats a list into its templates
  assert c["CIFAR100"][1] == "aquarium_fish" and c["CIFAR10"][1] == "automobile"
  assert c["OxfordIIITPet"][1] == "American Bulldog" and c["RESISC45"][2] == "baseball diamond"
  assert c["GTSRB"][17] == "red circle with white horizonal stripe no entry"
  assert c["PCAM"] == ("lymph node", "lymph node containing metastatic tumor tissue")


def test_classnames_follow_tfds_label_order():
  """Name i must describe tfds label i: each list re-derived from tfds label names + the reference's edits."""
  c = vision_tasks.CLASSNAMES
  assert c["Cars"] == tuple(n.replace("_", " ") for n in _tfds_label_names("cars196"))
  assert c["DTD"] == tuple(n.replace("_", " ") for n in _tfds_label_names("dtd"))
  sun397 = _tfds_label_names("sun397/tfds")  # "/a/apartment_building/outdoor"
  assert c["SUN397"] == tuple(n[3:].replace("/", " ").replace("_", " ") for n in sun397)
  assert c["Flowers102"] == tuple(_tfds_label_names("oxford_flowers102"))
  assert c["OxfordIIITPet"] == tuple(
    " ".join(p.title() for p in n.split("_")) for n in _tfds_label_names("oxford_iiit_pet")
  )
  assert c["Food101"] == tuple(_tfds_label_names("food101"))
  assert c["Food101"][16:18] == ("cheesecake", "cheese_plate")  # tfds order, not torchvision's sorted order
  assert c["RESISC45"] == tuple(n.replace("_", " ") for n in _tfds_label_names("resisc45"))
  assert c["FashionMNIST"] == tuple(_tfds_label_names("fashion_mnist"))
  assert c["KMNIST"] == tuple(_tfds_label_names("kmnist"))
  assert _tfds_label_names("eurosat/rgb")[2] == "HerbaceousVegetation"


@pytest.mark.parametrize(
  "name",
  [
    n
    for n in common.TASKS_20 + common.GLUE_7
    if not registry.get(n).tfds_name.startswith(IMAGE_FOLDER_BUILDER)
  ],
)
def test_tfds_builders_exist_with_matching_classes(name):
  task = registry.get(name)
  builder = tfds.builder(task.tfds_name, data_dir="/nonexistent/tfds")
  assert builder.info.features["label"].num_classes == task.num_classes
  for field in task.text_fields:
    assert field in builder.info.features


def test_get_unknown_lists_known_names():
  with pytest.raises(ValueError, match=r"Unknown task 'Imagenet'.*Cars.*SUN397"):
    registry.get("Imagenet")


def test_register_duplicate_and_validation():
  with pytest.raises(ValueError, match="already registered"):
    registry.register(registry.get("MNIST"))
  with pytest.raises(ValueError, match="3 classnames for num_classes=2"):
    Task(
      name="x",
      modality="vision",
      num_classes=2,
      split="test",
      reader=registry.read_tfds,
      classnames=("a", "b", "c"),
      templates=("{}",),
    )
  with pytest.raises(ValueError, match="exactly one"):
    Task(
      name="x",
      modality="vision",
      num_classes=1,
      split="test",
      reader=registry.read_tfds,
      classnames=("a",),
      templates=("no slot",),
    )
  with pytest.raises(ValueError, match="modality"):
    Task(name="x", modality="audio", num_classes=1, split="test", reader=registry.read_tfds)


def test_missing_dataset_names_task_dir_and_recipe(tmp_path):
  where = re.escape(str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match=rf"Task SVHN.*svhn_cropped.*{where}.*tfds build"):
    registry.get("SVHN").open_source(data_dir=tmp_path)
  with pytest.raises(DatasetNotFoundError, match=r"Task GTSRB.*class folders 00000\.\.00042"):
    registry.get("GTSRB").open_source(data_dir=tmp_path)


def test_mock_tfds_sources_without_tensorflow():
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    mnist = registry.get("MNIST").open_source()
    cola = registry.get("cola").open_source()
    qnli = registry.get("qnli").open_source()
    assert len(mnist) == 5
    example = mnist[2]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    assert isinstance(example["label"], int) and 0 <= example["label"] < 10
    assert isinstance(cola[0]["text_a"], str) and "text_b" not in cola[0]
    assert isinstance(qnli[0]["text_b"], str)


def test_num_classes_mismatch_is_reported():
  wrong = Task(
    name="MNIST7",
    modality="vision",
    num_classes=7,
    split="test",
    reader=registry.read_tfds,
    tfds_name="mnist",
    classnames=tuple("0123456"),
    templates=("{}",),
  )
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(DatasetMismatchError, match="has 10 classes, the registry expects 7"):
      wrong.open_source()


def _write_folder(root, split, images_per_class):
  """<root>/rendered_sst2/<split>/<negative|positive>/<i>.png, distinct pixel values -> (label, channels)."""
  expected = {}
  for label, cls in enumerate(("negative", "positive")):
    os.makedirs(os.path.join(root, "rendered_sst2", split, cls))
    for i in range(images_per_class):
      value = 40 * label + 10 * i
      mode_gray = i == 0
      array = np.full((6, 9) if mode_gray else (6, 9, 3), value, np.uint8)
      Image.fromarray(array).save(os.path.join(root, "rendered_sst2", split, cls, f"{i}.png"))
      expected[value] = (label, 1 if mode_gray else 3)
  return expected


def test_prepare_image_folder_round_trip(tmp_path):
  manual = tmp_path / "manual"
  expected = _write_folder(manual, "test", images_per_class=3)
  image_folder.prepare_image_folder("RenderedSST2", tmp_path / "data", manual_dir=manual)
  source = registry.get("RenderedSST2").open_source(data_dir=tmp_path / "data")
  assert len(source) == 6
  seen = {}
  for i in range(len(source)):
    record = source[i]
    image = record["image"]
    assert image.dtype == np.uint8 and image.shape[:2] == (6, 9)
    seen[int(image[0, 0, 0])] = (record["label"], image.shape[2])
  assert seen == expected
  with pytest.raises(DatasetNotFoundError, match="split 'train'.*prepared splits: \\['test'\\]"):
    registry.get("RenderedSST2").open_source("train", data_dir=tmp_path / "data")


def test_validation_splits_are_registered_and_sliced_by_tfds(tmp_path):
  for name in common.TASKS_20 + common.GLUE_7:
    task = registry.get(name)
    assert task.validation_split == (
      "val" if task.tfds_name.startswith(IMAGE_FOLDER_BUILDER) else registry.TFDS_VALIDATION
    ), name
  manual = tmp_path / "manual"
  _write_folder(manual, "test", images_per_class=4)
  _write_folder(manual, "val", images_per_class=2)
  image_folder.prepare_image_folder("RenderedSST2", tmp_path / "data", manual_dir=manual)
  task = registry.get("RenderedSST2")
  assert len(task.open_source(task.validation_split, data_dir=tmp_path / "data")) == 4
  # tfds slicing reaches the data source, as "train[90%:]" does for the tfds tasks.
  assert len(task.open_source("test[75%:]", data_dir=tmp_path / "data")) == 2


def test_prepare_image_folder_rejects_wrong_class_count(tmp_path):
  os.makedirs(tmp_path / "manual" / "fer2013" / "test" / "0")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "manual" / "fer2013" / "test" / "0" / "a.png")
  with pytest.raises(DatasetMismatchError, match="1 class folders, expected 7"):
    image_folder.prepare_image_folder("FER2013", tmp_path / "data", manual_dir=tmp_path / "manual")
  with pytest.raises(ValueError, match="not an image-folder task"):
    image_folder.prepare_image_folder("MNIST", tmp_path / "data")
