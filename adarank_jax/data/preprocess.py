"""CLIP evaluation preprocessing in numpy/PIL, identical to open_clip's `image_transform(size, False)`.

open_clip (resize_mode "shortest", the default) composes, on a PIL image:
  Resize(size, BICUBIC)  -> shortest side = size, longest = int(size * long / short) (PIL, antialiased)
  CenterCrop(size)       -> offsets int(round((h - size) / 2)), int(round((w - size) / 2))
  convert("RGB")         -> grey images are replicated to 3 channels (after the resize, as open_clip does)
  ToTensor, Normalize    -> x / 255, then (x - mean) / std in float32 with the OpenAI mean / std
Here the output is float32 (size, size, 3), channels last (JAX convolutions take NHWC).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_pil(image: np.ndarray) -> Image.Image:
  """uint8 (H, W, 1 | 3) -> a PIL image in mode "L" or "RGB"."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
      f"clip_eval expects a uint8 (H, W, 1 or 3) image, got dtype {image.dtype} shape {image.shape}"
    )
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"clip_eval got an empty image of shape {image.shape}")
  return Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
  """torchvision `Resize(size)` on a PIL image: shortest side -> size, bicubic, aspect ratio kept."""
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_short, new_long = size, int(size * long / short)
  new_size = (new_short, new_long) if width <= height else (new_long, new_short)
  return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision `CenterCrop(size)` for an image at least `size` on both sides."""
  width, height = image.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def clip_eval(image: np.ndarray, image_size: int) -> np.ndarray:
  """The open_clip evaluation transform.

  Args:
    image: uint8 (H, W, C) with C = 1 (grey) or 3 (RGB).
    image_size: the model's input resolution (224 for ViT-B/32 and ViT-L/14).

  Returns:
    float32 (image_size, image_size, 3), normalised with OPENAI_MEAN / OPENAI_STD.
  """
  pil = center_crop(resize_shortest(_as_pil(image), image_size), image_size).convert("RGB")
  pixels = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
  return (pixels - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)
