"""The pixel convention, in one place: images are uint8 on disk and in PNGs, float32 in [-1, 1] (NHWC) inside JAX."""

import numpy as np


def to_float(images) -> np.ndarray:
  """uint8 images (any leading shape, channels last) -> float32 in [-1, 1]."""
  return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] (host or device arrays) -> uint8, rounding to nearest and clipping; uint8 passes.

  Raises:
    ValueError: for an integer dtype other than uint8.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"expected uint8 or float images; got {images.dtype}")
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
