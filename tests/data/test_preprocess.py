"""Parity of adarank_jax.data.preprocess.clip_eval with open_clip's evaluation transform."""

import numpy as np
import open_clip
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from adarank_jax.data import preprocess


def _cases():
  china, flower = load_sample_images().images  # real photos, (427, 640, 3) uint8
  digit = np.round(load_digits().images[3] * (255 / 16)).astype(np.uint8)[:, :, None]  # 8x8 grey -> 28x up
  return {
    "china": china,
    "flower": flower,
    "grey": np.asarray(Image.fromarray(china).convert("L"))[:, :, None],
    "digit": digit,
    "portrait_odd": flower[:301, :223],  # taller than wide, odd crop offsets
    "exact_size": china[:224, 100:324],  # already 224: resize is a no-op
  }


@pytest.mark.parametrize("image_size", [224, 160])
def test_matches_open_clip(image_size):
  reference = open_clip.image_transform(image_size, is_train=False)
  for name, image in _cases().items():
    pil = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    expected = reference(pil).numpy().transpose(1, 2, 0)
    ours = preprocess.clip_eval(image, image_size)
    assert ours.dtype == np.float32 and ours.shape == (image_size, image_size, 3), name
    max_diff = float(np.abs(ours - expected).max())
    print(f"{name} {image.shape} -> {image_size}: max |ours - open_clip| = {max_diff:.3g}")
    assert max_diff < 1e-6, name


def test_grey_becomes_three_equal_channels_before_normalisation():
  grey = _cases()["grey"]
  out = preprocess.clip_eval(grey, 224)
  std, mean = np.asarray(preprocess.OPENAI_STD, np.float32), np.asarray(preprocess.OPENAI_MEAN, np.float32)
  pixels = out * std + mean
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-6)
  np.testing.assert_allclose(pixels[..., 1], pixels[..., 2], atol=1e-6)


@pytest.mark.parametrize(
  "bad",
  [
    np.zeros((8, 8), np.uint8),
    np.zeros((8, 8, 4), np.uint8),
    np.zeros((8, 8, 3), np.float32),
    np.zeros((0, 8, 3), np.uint8),
  ],
)
def test_rejects_bad_images(bad):
  with pytest.raises(ValueError, match="clip_eval"):
    preprocess.clip_eval(bad, 224)
