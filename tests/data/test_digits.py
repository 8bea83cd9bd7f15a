"""The embedded digits benchmark: tasks, and a quick testbed build read back as real checkpoints."""

import json
import os

import jax
import numpy as np
import pytest

from adarank_jax.core import tree_util
from adarank_jax.data import digits as tasks
from adarank_jax.data import preprocess, registry
from adarank_jax.digits import testbed
from adarank_jax.interop import openclip, openclip_config
from adarank_jax.models import clip

CLASS_COUNTS = {
  "Digits": 10,
  "DigitsRotated": 10,
  "DigitsMirrored": 10,
  "DigitsInverted": 10,
  "DigitsNoisy": 10,
  "DigitsParity": 2,
  "DigitsMagnitude": 2,
  "DigitsMod3": 3,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  cache_dir = tmp_path_factory.mktemp("digits_cache")
  return cache_dir, testbed.build(cache_dir, quick=True, seed=0)


def _shapes(tree):
  return {path: tuple(leaf.shape) for path, leaf in tree_util.flatten(tree).items()}


def test_tasks_registered_with_class_counts():
  assert tasks.TASKS == tuple(CLASS_COUNTS)
  assert registry.names()[-len(tasks.TASKS) :] == tasks.TASKS  # built in, registered in this order
  for name, count in CLASS_COUNTS.items():
    task = registry.get(name)
    assert (task.modality, task.num_classes, len(task.classnames), task.split) == (
      "vision",
      count,
      count,
      "test",
    )
    assert task.validation_split == "validation"
    train, validation, test = (task.open_source(split) for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (970, 108, 719)  # 1,797 images, disjoint
    labels = np.array([test[i]["label"] for i in range(len(test))])
    assert set(labels.tolist()) == set(range(count))
    image = test[0]["image"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (1, 3)
  with pytest.raises(ValueError, match="unknown split 'val'"):
    registry.get("Digits").open_source("val")
  _, _, splits = tasks._digits()  # pylint: disable=protected-access
  assert not set(splits["train"]) & set(splits["validation"]) and not set(splits["test"]) & (
    set(splits["train"]) | set(splits["validation"])
  )
  digits = tasks.digit_values("validation")
  assert np.bincount(digits, minlength=10).min() >= 9  # stratified: every digit is there


def test_tasks_differ_in_inputs_and_labels():
  digits = tasks.digit_values("test")
  plain, plain_labels = tasks.arrays("Digits", "test")
  np.testing.assert_array_equal(plain_labels, digits)
  for name in ("DigitsParity", "DigitsMagnitude", "DigitsMod3"):
    assert not np.array_equal(tasks.arrays(name, "test")[1], digits), name
  np.testing.assert_array_equal(tasks.arrays("DigitsParity", "test")[1], digits % 2)

  # Every transformed task shows the same test digits differently, once through the CLIP transform.
  def pixels(name):  # the first 50 test images as the model sees them
    return np.stack([preprocess.clip_eval(image, 32) for image in tasks.arrays(name, "test")[0][:50]])

  plain_pixels = pixels("Digits")
  for name in tasks.TASKS[1:]:
    assert np.abs(pixels(name) - plain_pixels).mean() > 0.2, name
  # Train and test hold different images.
  train_images = set(map(bytes, tasks.arrays("Digits", "train")[0].reshape(970, -1)))
  assert not train_images & set(map(bytes, plain.reshape(719, -1)))


def test_task_data_are_deterministic():
  tasks.arrays.cache_clear()
  first = tasks.arrays("DigitsNoisy", "train")[0].copy()
  tasks.arrays.cache_clear()
  np.testing.assert_array_equal(tasks.arrays("DigitsNoisy", "train")[0], first)


def test_checkpoints_load_as_openclip(built):
  _, bed = built
  config = openclip_config.load_config(bed.model_config)
  full = openclip.load_openclip(bed.pretrained, config, text=True)
  assert _shapes(full) == _shapes(clip.abstract_params(config))
  visual_shapes = _shapes(clip.abstract_params(config.vision))
  pretrained_leaves = tree_util.flatten(full["visual"])
  for task in bed.tasks:
    tuned = openclip.load_openclip(bed.finetuned(task), config, text=True)
    assert _shapes(tuned["visual"]) == visual_shapes
    # Text tower and logit scale stay pretrained; the image tower moved.
    for a, b in zip(jax.tree.leaves(tuned["text"]), jax.tree.leaves(full["text"])):
      np.testing.assert_array_equal(a, b)
    assert tuned["logit_scale"] == full["logit_scale"]
    moved = [
      path
      for path, leaf in tree_util.flatten(tuned["visual"]).items()
      if not np.array_equal(leaf, pretrained_leaves[path])
    ]
    assert len(moved) > len(pretrained_leaves) // 2, task
  assert bed.finetuned_paths == tuple(bed.finetuned(t) for t in bed.tasks)


def test_checkpoints_run_in_open_clip(built, tmp_path):
  """open_clip.create_model builds the config and loads a checkpoint; its features equal the JAX ones."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from adarank_jax.models import functional  # pylint: disable=g-import-not-at-top

  _, bed = built
  config_file = tmp_path / "digits-test-tiny-clip.json"
  config_file.write_text(open(bed.model_config, encoding="utf-8").read())
  open_clip.add_model_config(config_file)
  model = open_clip.create_model("digits-test-tiny-clip", pretrained=bed.finetuned("DigitsMod3")).eval()
  config = openclip_config.load_config(bed.model_config)
  images = np.stack(
    [
      preprocess.clip_eval(image, config.vision.image_size)
      for image in tasks.arrays("DigitsMod3", "test")[0][:4]
    ]
  )
  with torch.no_grad():
    expected = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  graphdef, _ = functional.split(
    nnx.eval_shape(lambda: clip.VisionTransformer(config.vision, rngs=nnx.Rngs(0)))
  )
  visual = openclip.load_openclip(bed.finetuned("DigitsMod3"), config)
  np.testing.assert_allclose(functional.call(graphdef, visual, images), expected, atol=1e-4, rtol=1e-4)


def test_cache_is_reused(built, capsys):
  cache_dir, bed = built
  files = [bed.pretrained, *bed.finetuned_paths, os.path.join(bed.directory, testbed.MANIFEST)]
  mtimes = [os.stat(f).st_mtime_ns for f in files]
  again = testbed.build(cache_dir, quick=True, seed=0)
  assert again == bed
  assert "reusing" in capsys.readouterr().out
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  assert sorted(os.listdir(cache_dir)) == [os.path.basename(bed.directory)]  # no temporary leftovers
  manifest = json.loads(open(files[-1], encoding="utf-8").read())
  assert manifest["tasks"] == list(bed.tasks) and manifest["quick"] and manifest["seed"] == 0
  assert "finetuned_accuracy" not in manifest  # quick builds are not evaluated


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise RuntimeError("interrupted")

  # What a killed build of the same testbed left behind (its process, 2**31 - 1, is not running).
  abandoned = tmp_path / f".digits-quick-{testbed._fingerprint(testbed.QUICK, 0)}.{2**31 - 1}.x7q"
  (abandoned / "finetuned").mkdir(parents=True)
  monkeypatch.setattr(testbed, "_pretrain", fail)
  with pytest.raises(RuntimeError, match="interrupted"):
    testbed.build(tmp_path, quick=True, seed=0)
  assert os.listdir(tmp_path) == []
