"""Eight merging tasks derived from scikit-learn's 8x8 digits (1,797 images, nothing downloaded).

The tasks differ in their input distribution and in their label space, as the paper's eight
vision tasks do:

  name              input                                     labels
  Digits            the digits as they are (8x8 grey)          the digit (10)
  DigitsRotated     rotated 90 degrees counter-clockwise       the digit (10)
  DigitsMirrored    mirrored left-right                        the digit (10)
  DigitsInverted    light background, dark strokes             the digit (10)
  DigitsNoisy       16x16, Gaussian pixel noise                the digit (10)
  DigitsParity      placed at a random spot of a 12x12 canvas  even / odd (2)
  DigitsMagnitude   16x16, Gaussian blur                       0-4 / 5-9 (2)
  DigitsMod3        8x8 RGB, random stroke and ground colours  the digit modulo 3 (3)

Every task uses the same stratified 60/40 split of the 1,797 images into training and test
images (fixed seed `DATA_SEED`), and a stratified tenth of the training images is held out as the
labelled validation split (as Task Arithmetic's {Task}Val sets are): pretraining and fine-tuning
see only "train", so neither a test nor a validation image is seen by any model of the testbed. Random
transforms (noise, offsets, colours) are drawn once per image from a per-task seed. The class
names of the three relabelled tasks list their digits in words ("one, three, five, seven or
nine"), the words the pretrained model's captions use, so their zero-shot heads carry some signal.

Images are uint8 (H, W, 1 or 3) in 0..255 (the 0..16 grey levels scaled by 255/16); resizing to
the model's resolution, grey -> RGB and normalisation happen in the shared CLIP preprocessing.
They are built-in tasks of `adarank_jax.data.registry` (which registers `entries()` on import),
with in-memory random-access sources, so `registry.get("DigitsParity").open_source("test")` works like any real data set.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from adarank_jax.data.task import Task

DATA_SEED = 0
TEST_FRACTION = 0.4
VALIDATION_FRACTION = 0.1  # of the training images (Task Arithmetic holds out 10% of train)
SPLITS = ("train", "validation", "test")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Captions the pretrained model sees: only plain descriptions of the digit's value.
PRETRAIN_TEMPLATES = ("a photo of the digit {}.", "the number {}.", "a handwritten {}.", "{}")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one task is made: `transform(images (N, 8, 8) float 0..16, rng) -> uint8 (N, H, W, C)`."""

  transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
  label: Callable[[np.ndarray], np.ndarray]
  classnames: tuple[str, ...]
  templates: tuple[str, ...]


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """(N, H, W) or (N, H, W, C) float in 0..16 -> uint8 (N, H, W, C) in 0..255."""
  images = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  return images[..., None] if images.ndim == 3 else images


def _upsample2(images: np.ndarray) -> np.ndarray:
  """(N, 8, 8) -> (N, 16, 16), each pixel repeated 2x2."""
  return images.repeat(2, axis=1).repeat(2, axis=2)


def _plain(images, rng):
  del rng
  return _to_uint8(images)


def _rotated(images, rng):
  del rng
  return _to_uint8(np.rot90(images, k=1, axes=(1, 2)))


def _mirrored(images, rng):
  del rng
  return _to_uint8(images[:, :, ::-1])


def _inverted(images, rng):
  del rng
  return _to_uint8(16.0 - images)


def _noisy(images, rng):
  big = _upsample2(images)
  return _to_uint8(big + rng.normal(0.0, 3.5, big.shape))


def _shifted(images, rng):
  """Each digit pasted at a random offset (0..4, 0..4) of a black 12x12 canvas."""
  canvas = np.zeros((len(images), 12, 12), images.dtype)
  offsets = rng.integers(0, 5, size=(len(images), 2))
  for i, (dy, dx) in enumerate(offsets):
    canvas[i, dy : dy + 8, dx : dx + 8] = images[i]
  return _to_uint8(canvas)


def _blurred(images, rng):
  del rng
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  return _to_uint8(ndimage.gaussian_filter(_upsample2(images), sigma=(0, 1.6, 1.6), mode="constant"))


def _coloured(images, rng):
  """Strokes in a random bright colour on a random dark colour (RGB)."""
  ink = rng.uniform(0.5, 1.0, size=(len(images), 1, 1, 3))
  ground = rng.uniform(0.0, 0.35, size=(len(images), 1, 1, 3))
  alpha = images[..., None] / 16.0
  return _to_uint8(16.0 * (alpha * ink + (1.0 - alpha) * ground))


def _digit(digits):
  return digits


_DIGIT_TASKS = {
  "Digits": (
    _plain,
    ("a photo of the digit {}.", "a photo of the number {}.", "a handwritten {}.", "the digit {}."),
  ),
  "DigitsRotated": (
    _rotated,
    (
      "a rotated photo of the digit {}.",
      "a photo of the digit {} turned sideways.",
      "the digit {}, rotated.",
    ),
  ),
  "DigitsMirrored": (
    _mirrored,
    ("a mirrored photo of the digit {}.", "the digit {} seen in a mirror.", "a flipped {}."),
  ),
  "DigitsInverted": (
    _inverted,
    ("an inverted photo of the digit {}.", "the digit {} in negative.", "a dark {} on a light background."),
  ),
  "DigitsNoisy": (
    _noisy,
    ("a noisy photo of the digit {}.", "a grainy photo of the number {}.", "the digit {} with noise."),
  ),
}
_SPECS = {
  name: _Spec(transform, _digit, DIGIT_WORDS, templates)
  for name, (transform, templates) in _DIGIT_TASKS.items()
}
# The label tasks name their classes by the digit words the pretrained model knows (as a prompt
# engineer would), so their zero-shot heads are informative but imperfect.
_SPECS["DigitsParity"] = _Spec(
  _shifted,
  lambda d: d % 2,
  ("zero, two, four, six or eight", "one, three, five, seven or nine"),
  ("a photo of an even number: {}.", "one of {}.", "a photo of one of the digits {}."),
)
_SPECS["DigitsMagnitude"] = _Spec(
  _blurred,
  lambda d: (d >= 5).astype(d.dtype),
  ("zero, one, two, three or four", "five, six, seven, eight or nine"),
  ("a blurry photo of one of {}.", "a number from {}.", "one of the digits {}."),
)
_SPECS["DigitsMod3"] = _Spec(
  _coloured,
  lambda d: d % 3,
  ("zero, three, six or nine", "one, four or seven", "two, five or eight"),
  ("a coloured photo of one of {}.", "a number from {}.", "one of the digits {}."),
)

TASKS = tuple(_SPECS)  # registration (and merging) order


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(images (1797, 8, 8) float 0..16, digits (1797,) int64, split name -> sorted indices)."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  data = datasets.load_digits()
  digits = data.target.astype(np.int64)
  train, test = model_selection.train_test_split(
    np.arange(len(digits)), test_size=TEST_FRACTION, stratify=digits, random_state=DATA_SEED
  )
  train, validation = model_selection.train_test_split(
    train, test_size=VALIDATION_FRACTION, stratify=digits[train], random_state=DATA_SEED
  )
  return (
    data.images.astype(np.float64),
    digits,
    {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)},
  )


@functools.cache
def arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The examples of one split as arrays (read-only).

  Args:
    name: one of `TASKS`.
    split: one of SPLITS.

  Returns:
    images: uint8 (N, H, W, C), C in (1, 3); labels: int64 (N,) in [0, num_classes).
  """
  if name not in _SPECS:
    raise ValueError(f"Unknown digits task {name!r}; digits tasks: {', '.join(TASKS)}")
  if split not in SPLITS:
    raise ValueError(f"Digits task {name}: unknown split {split!r}; splits: {', '.join(SPLITS)}")
  spec = _SPECS[name]
  images, digits, splits = _digits()
  rng = np.random.default_rng([DATA_SEED, TASKS.index(name)])
  transformed = spec.transform(images, rng)  # drawn for all 1,797 images, so splits are independent
  index = splits[split]
  out_images = np.ascontiguousarray(transformed[index])
  out_labels = spec.label(digits[index]).astype(np.int64)
  out_images.flags.writeable = False
  out_labels.flags.writeable = False
  return out_images, out_labels


def digit_values(split: str) -> np.ndarray:
  """int64 (N,) the digit shown by each example of `split` (the same for every task)."""
  if split not in SPLITS:
    raise ValueError(f"Digits: unknown split {split!r}; splits: {', '.join(SPLITS)}")
  _, digits, splits = _digits()
  return digits[splits[split]]


class ArraySource:
  """Random-access source over in-memory arrays: src[i] = {"image": uint8 (H, W, C), "label": int}."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"ArraySource: {len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, object]:
    return {"image": self.images[index], "label": int(self.labels[index])}


def _read(task: Task, split: str, data_dir: str | None) -> ArraySource:
  """The reader of the digits tasks; `data_dir` is ignored (the data are built in memory)."""
  del data_dir
  return ArraySource(*arrays(task.name, split))


def entries() -> tuple[Task, ...]:
  """The digits tasks as `Task` records, in TASKS order (`adarank_jax.data.registry` registers them)."""
  return tuple(
    Task(
      name=name,
      modality="vision",
      num_classes=len(spec.classnames),
      split="test",
      validation_split="validation",
      reader=_read,
      classnames=spec.classnames,
      templates=spec.templates,
      prepare="nothing to prepare: built in memory from sklearn.datasets.load_digits",
    )
    for name, spec in _SPECS.items()
  )
