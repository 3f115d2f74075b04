"""`data.name = "arrayrecord"`: trains in pixel space on a dataset converted by `rflow_jax.data.convert`.

The source checks DATA.path/manifest.json and every shard's sha256 when it is built (before anything is compiled),
then serves record i as {image uint8 (S, S, 3), caption str, index int64} like `shapes.ShapesSource`: the stored
image is decoded, its shorter side resized to S (Pillow's antialiased bicubic) and the centre S x S cropped.

With aspect-ratio buckets (data.buckets, rflow_jax/data/buckets.py) the source reads every record's stored width and
height once when it is built, assigns each record its bucket, and serves record i resized to cover its bucket's
(height, width) and centre-cropped to it.
"""

from __future__ import annotations

import io
import operator

import grain
import numpy as np
from PIL import Image, ImageOps

from rflow_jax.data import buckets as bucket_lib, records

_SCAN_CHUNK = 4096  # Records read at once when scanning the stored sizes.


def fit(image: Image.Image, height: int, width: int) -> np.ndarray:
  """Resizes to cover height x width (aspect kept) and crops the centre; returns uint8 (height, width, 3)."""
  if image.size != (width, height):  # Pillow sizes are (width, height).
    image = ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def fit_square(image: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` and crops the centre `size` x `size`; returns uint8 (size, size, 3)."""
  return fit(image, size, size)


class ArrayRecordImageSource(grain.sources.RandomAccessDataSource):
  """Random access to the image-caption records of a converted dataset (picklable for grain workers)."""

  def __init__(self, path: str, image_size: int, buckets: tuple[tuple[int, int], ...] = ()):
    """Verifies the dataset and opens its shards (and, with buckets, reads every record's size).

    Args:
      path: the converter's output directory (holds manifest.json).
      image_size: side S of the square images served (without buckets).
      buckets: (height, width) sizes; record i is served at buckets[assignment[i]]. () = squares of image_size.

    Raises:
      records.ManifestError: no manifest, another format, a missing shard or one that fails its hash.
    """
    if image_size <= 0:
      raise ValueError(f"image_size must be positive; got {image_size!r}")
    manifest = records.load_manifest(path)
    shard_paths = records.verify_shards(path, manifest)
    total = sum(s["num_records"] for s in manifest["shards"])
    if total != manifest["num_records"] or total == 0:
      raise records.ManifestError(
          f"{path}/{records.MANIFEST} says num_records={manifest['num_records']} but its " f"shards hold {total}"
      )
    self._path, self._size, self._num_records = path, int(image_size), total
    # Shards without records add nothing to the index space; the reader is given only the others.
    self._records = grain.sources.ArrayRecordDataSource(
        [p for p, s in zip(shard_paths, manifest["shards"]) if s["num_records"]]
    )
    self._buckets = tuple(tuple(b) for b in buckets)
    # (N,) bucket of each record, or None: the stored sizes decide it, so it is read once, here.
    self.assignment = None
    if self._buckets:
      heights, widths = self.record_sizes()
      self.assignment = bucket_lib.assign(heights, widths, self._buckets)

  def record_sizes(self) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) int64 (N,): every record's stored image size, from its `height` and `width` fields."""
    heights, widths = np.zeros(self._num_records, np.int64), np.zeros(self._num_records, np.int64)
    for first in range(0, self._num_records, _SCAN_CHUNK):
      last = min(first + _SCAN_CHUNK, self._num_records)
      for i, raw in zip(range(first, last), self._records.__getitems__(range(first, last))):
        record = records.decode_record(raw)
        heights[i], widths[i] = record["height"], record["width"]
    return heights, widths

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> dict[str, object]:
    index = operator.index(index)
    if not 0 <= index < self._num_records:
      raise IndexError(f"record index {index} out of range [0, {self._num_records})")
    record = records.decode_record(self._records[index])
    with Image.open(io.BytesIO(record["image"])) as image:
      if self._buckets:
        pixels = fit(image, *self._buckets[self.assignment[index]])
      else:
        pixels = fit_square(image, self._size)
    return {"image": pixels, "caption": record["caption"], "index": np.int64(index)}

  def __repr__(self) -> str:
    buckets = f", buckets={self._buckets}" if self._buckets else ""
    return f"ArrayRecordImageSource(path={self._path!r}, image_size={self._size}{buckets})"
