"""The converted image-caption record format: one record's bytes, the image policy behind them, and the manifest.

A converted dataset is a directory of ArrayRecord shards plus `manifest.json` (written by `rflow_jax.data.convert`,
read by `rflow_jax.data.arrayrecord`). Record i of the dataset is record i - first_index of the shard whose range
holds it (shards in manifest order, ranges from their `num_records`), so a later job (latent and text-embedding
precompute) can store record i's outputs under the same global index.

One record is a msgpack map (format version 1):

  image         bytes  the encoded image (JPEG, PNG, WebP, ...); decodes to 8-bit RGB of width x height
  image_format  str    the codec, as Pillow names it ("JPEG", "PNG", ...)
  width, height int    size of the stored image in pixels
  caption       str    the caption, UTF-8, surrounding whitespace stripped
  key           str    where the record came from (a path under the input, "tar:member stem", "split[i]")
  source_mode   str    the source's pixel mode before conversion ("RGB", "L", "I;16", "RGBA", "P", "RGB;16", ...)
  label         int    the class index (only for TFDS class-label captions)

Why encoded bytes rather than decoded pixels: the originals are ~10x smaller than uint8 arrays, lossless to keep,
and keep the full resolution and aspect ratio that later stages (high-resolution training, aspect-ratio buckets)
need; decoding costs about a millisecond per small image at read time, and the precompute stage decodes each record
once. Files that are already 8-bit RGB keep their bytes exactly; every other mode is converted once, explicitly, and
re-encoded as PNG (lossless), so a reader never meets anything but 8-bit RGB:

  * L, 1, P without transparency, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB;
  * RGBA, LA, PA, P with transparency: composited over white (a transparent background reads as paper, not black);
  * 16-bit grayscale (I;16*): scaled x * 255 / 65535 with rounding. Pillow's own RGB conversion would clip it at 255
    and turn most of the image white, so it is never used for this mode;
  * 16-bit RGB(A) PNG: Pillow's decoder keeps the high byte (x // 256, within one level of rounding); the record
    names it `source_mode="RGB;16"`;
  * 32-bit integer (I) and float (F) images have no known range and are refused as bad records;
  * an EXIF orientation other than 1 is applied to the pixels; animated images keep their first frame.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import msgpack
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMAT = "rflow_jax.image_text_records"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BAD_RECORDS = "bad_records.jsonl"
_WHITE = (255, 255, 255)
_DIRECT_MODES = ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadRecordError(ValueError):
  """One input that cannot become a record; the message names it and says why, in one line."""

  def __init__(self, key: str, reason: str):
    self.key, self.reason = key, " ".join(str(reason).split())  # One line, whatever the decoder said.
    super().__init__(f"bad record {key}: {self.reason}")

  def __reduce__(self):  # Crosses from a converter worker process to the parent.
    return BadRecordError, (self.key, self.reason)


class ManifestError(ValueError):
  """A converted dataset that is missing, incomplete or does not match its manifest."""


def decode_caption(raw: bytes, key: str) -> str:
  """UTF-8 caption bytes -> the stripped caption; raises BadRecordError naming the first bad byte."""
  try:
    return raw.decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise BadRecordError(key, f"caption is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _to_rgb8(image: Image.Image, key: str, mode: str) -> tuple[Image.Image, str]:
  """(8-bit RGB image, source mode); raises BadRecordError for a mode with no defined 8-bit meaning."""
  image = ImageOps.exif_transpose(image)
  if image.mode.startswith("I;16"):
    pixels = np.asarray(image, dtype=np.uint32)
    gray = ((pixels * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB"), mode
  if image.mode in ("I", "F"):
    raise BadRecordError(
        key, f"unsupported pixel mode {image.mode} (32-bit values of unknown range): " "convert it to 8-bit RGB first"
    )
  if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB"), mode
  if image.mode == "RGB":
    return image, mode
  if image.mode in _DIRECT_MODES:
    return image.convert("RGB"), mode
  raise BadRecordError(key, f"unsupported pixel mode {image.mode}")


def normalize_image(data: bytes, key: str, min_size: int = 0) -> tuple[bytes, str, int, int, str]:
  """Checks and, where needed, converts one encoded image to the record policy (module docstring).

  Args:
    data: the encoded image file.
    key: the input's name, for error messages.
    min_size: images whose width or height is below this are bad records (0 = no minimum).

  Returns:
    (encoded bytes, codec name, width, height, source mode); the bytes are `data` itself when it already decodes
    to 8-bit RGB with no EXIF rotation.

  Raises:
    BadRecordError: undecodable, truncated, too small or of an unsupported mode.
  """
  try:
    image = Image.open(io.BytesIO(data))
    image_format, mode = image.format, image.mode
    tile_mode = image.tile[0].args if image.tile and isinstance(image.tile[0].args, str) else ""
    if mode in ("RGB", "RGBA") and "16" in tile_mode:
      mode += ";16"  # Decoded from 16 bits per channel by Pillow, which keeps the high byte.
    image.load()  # Decodes every pixel: a truncated or corrupt file fails here, not in training.
  except UnidentifiedImageError:
    raise BadRecordError(key, "not an image file Pillow can decode") from None
  except Exception as e:  # pylint: disable=broad-except  # Pillow raises many types for bad files.
    raise BadRecordError(key, f"cannot decode image: {type(e).__name__}: {e}") from None
  width, height = image.size
  if min(width, height) < min_size:
    raise BadRecordError(key, f"image is {width}x{height}, below --min_size={min_size}")
  orientation = image.getexif().get(0x0112, 1)
  rgb, mode = _to_rgb8(image, key, mode)
  if mode == "RGB" and orientation == 1:
    return data, image_format, width, height, mode
  out = io.BytesIO()
  rgb.save(out, format="PNG")
  return out.getvalue(), "PNG", rgb.size[0], rgb.size[1], mode


def encode_record(record: dict) -> bytes:
  """A record dict (module docstring's fields) -> its serialized bytes."""
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """Serialized record bytes -> the record dict."""
  return msgpack.unpackb(data, raw=False)


def decode_image(record: dict) -> np.ndarray:
  """The record's image as uint8 (height, width, 3)."""
  with Image.open(io.BytesIO(record["image"])) as image:
    return np.asarray(image.convert("RGB"))


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary name beside `path`, then renames it into place (a reader sees all or nothing)."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")  # Hidden, and removed by the next convert if stale.
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
  """Writes `obj` as JSON (sorted keys, so equal objects give equal bytes) atomically (write_text_atomic)."""
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def load_manifest(
    directory: str,
    *,
    fmt: str = FORMAT,
    version: int | tuple[int, ...] = FORMAT_VERSION,
    what: str = "a converted dataset",
    made_by: str = "its conversion did not finish (run python -m rflow_jax.data.convert)",
    reader: str = "this reader needs",
) -> dict:
  """Reads DIR/manifest.json and checks its format; raises ManifestError in one line if it is not ours.

  The defaults describe a converted dataset; data/precomputed.py passes its own format, versions and wording.
  """
  versions = version if isinstance(version, tuple) else (version,)
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ManifestError(f"{directory!r} has no {MANIFEST}: not {what}, or {made_by}")
  with open(path) as f:
    try:
      manifest = json.load(f)
    except ValueError as e:
      raise ManifestError(f"{path} is not valid JSON: {e}") from None
  if manifest.get("format") != fmt or manifest.get("format_version") not in versions:
    raise ManifestError(
        f"{path} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
        f"{reader} {fmt!r} version {' or '.join(map(str, versions))}"
    )
  return manifest


def verify_shards(directory: str, manifest: dict) -> list[str]:
  """Checks every shard's sha256 against the manifest; returns the shard paths in order.

  Raises:
    ManifestError: a shard is missing or its content differs from what the manifest recorded.
  """
  paths = []
  for shard in manifest["shards"]:
    path = os.path.join(directory, shard["file"])
    if not os.path.isfile(path):
      raise ManifestError(f"shard {path} listed in {MANIFEST} is missing")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
      raise ManifestError(
          f"shard {path} fails its hash: sha256 {digest[:16]}… but {MANIFEST} says "
          f"{shard['sha256'][:16]}… (changed or damaged since conversion; convert again)"
      )
    paths.append(path)
  return paths
