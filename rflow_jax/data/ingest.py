"""The input formats of `rflow_jax.data.convert`: each turns a source into shard jobs and a job into raw examples.

A *plan* is the deterministic list of output shards a source gives: `plan(options)` returns the jobs (picklable
dicts, one per output shard, each with a `fingerprint` that changes when its inputs do) and the bad inputs found
while planning. `read_job(job, options)` then yields, in order, `(key, image_bytes, caption, label)` for each
example or a `records.BadRecordError` for an input that cannot be one; the converter checks the image and writes
the shard.

  imagefolder  --input=DIR: images (jpg, jpeg, png, webp, bmp, gif, tif, tiff) anywhere under DIR, in sorted path
               order; the caption is the `--caption_field` ("text") of the `metadata.jsonl` line whose `file_name`
               names it (relative to that metadata file's folder), else the contents of a `.txt` of the same stem
               beside it. `--records_per_shard` images per shard.
  webdataset   --input=a .tar file or a DIR of them (sorted): samples grouped by key (the member path up to the first
               dot of its file name), image from jpg/jpeg/png/webp, caption from `txt`, else the `--caption_field`
               ("caption") of `json`; img2dataset's layout. One output shard per input tar.
  tfds         --input=a TFDS name (prepared under --tfds_data_dir) or a prepared dataset directory (the one holding
               dataset_info.json); `--image_field` ("image"), `--caption_field` ("label"): a ClassLabel becomes
               `--caption_template` ("a photo of a {label}") with the class name, a Text feature its text. Read in
               order by the main process (tf.data decodes in parallel), `--records_per_shard` examples per shard.
               Never downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np

from rflow_jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_FIELD = {"imagefolder": "text", "webdataset": "caption", "tfds": "label"}
METADATA = "metadata.jsonl"


def _fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _stat(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


# --- imagefolder ---------------------------------------------------------------------------------------------------


def _read_metadata(path: str, root: str, caption_field: str, bad: list):
  """{image path relative to root: caption or a BadRecordError} from one metadata.jsonl."""
  folder = os.path.relpath(os.path.dirname(path), root)
  name = os.path.relpath(path, root)
  entries = {}
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      key = f"{name}:{number}"
      try:
        entry = json.loads(raw.decode("utf-8"))
        file_name = entry["file_name"]
      except UnicodeDecodeError as e:
        bad.append(records.BadRecordError(key, f"line is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"))
        continue
      except (ValueError, KeyError, TypeError) as e:
        bad.append(records.BadRecordError(key, f"not a JSON object with a file_name: {type(e).__name__}: {e}"))
        continue
      image = os.path.normpath(os.path.join(folder, file_name))
      caption = entry.get(caption_field)
      if not isinstance(caption, str):
        caption = records.BadRecordError(
            image, f"missing caption: {METADATA} line {number} has no string " f"{caption_field!r} field"
        )
      entries[image] = caption
  return entries


def _plan_imagefolder(options) -> tuple[list[dict], list]:
  root = os.path.abspath(options.input)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--input={options.input!r} is not a directory (the imagefolder format reads a folder)")
  images, captions, bad = [], {}, []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in sorted(files):
      rel = os.path.normpath(os.path.relpath(os.path.join(folder, f), root))
      if f == METADATA:
        captions.update(_read_metadata(os.path.join(folder, f), root, options.caption_field, bad))
      elif f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
        images.append(rel)
  images.sort()
  image_set = set(images)
  for rel in sorted(set(captions) - image_set):
    bad.append(records.BadRecordError(rel, f"listed in {METADATA} but no such image file"))
  items = []
  for rel in images:
    caption = captions.get(rel)
    txt = os.path.splitext(rel)[0] + ".txt"
    if isinstance(caption, records.BadRecordError):
      items.append({"path": rel, "error": caption.reason})
    elif caption is not None:
      items.append({"path": rel, "caption": caption})
    elif os.path.isfile(os.path.join(root, txt)):
      items.append({"path": rel, "caption_file": txt})
    else:
      items.append({"path": rel, "error": f"missing caption: no {METADATA} entry and no {txt}"})
  n = options.records_per_shard
  jobs = []
  for start in range(0, len(items), n):
    chunk = items[start : start + n]
    stats = [_stat(os.path.join(root, it["path"])) for it in chunk]
    jobs.append({"items": chunk, "fingerprint": _fingerprint("imagefolder", root, chunk, stats)})
  return jobs, bad


def _read_imagefolder(job, options):
  root = os.path.abspath(options.input)
  for item in job["items"]:
    key = item["path"]
    if "error" in item:
      yield records.BadRecordError(key, item["error"])
      continue
    caption = item.get("caption")
    try:
      if caption is None:
        with open(os.path.join(root, item["caption_file"]), "rb") as f:
          caption = records.decode_caption(f.read(), item["caption_file"])
      with open(os.path.join(root, key), "rb") as f:
        yield key, f.read(), caption, None
    except records.BadRecordError as e:
      yield e
    except OSError as e:
      yield records.BadRecordError(key, f"cannot read: {e.strerror or e}")


# --- webdataset ----------------------------------------------------------------------------------------------------


def _plan_webdataset(options) -> tuple[list[dict], list]:
  path = os.path.abspath(options.input)
  if os.path.isdir(path):
    tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".tar", ".tar.gz", ".tgz")))
  elif os.path.isfile(path):
    tars = [path]
  else:
    raise FileNotFoundError(
        f"--input={options.input!r} does not exist (the webdataset format reads a .tar or a " "folder of them)"
    )
  return [{"tar": t, "fingerprint": _fingerprint("webdataset", t, _stat(t))} for t in tars], []


def _wds_sample(key: str, members: dict, caption_field: str):
  image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
  if image is None:
    return records.BadRecordError(key, f"no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)}); has {sorted(members)}")
  try:
    if "txt" in members:
      caption = records.decode_caption(members["txt"], f"{key}.txt")
    elif "json" in members:
      meta = json.loads(records.decode_caption(members["json"], f"{key}.json"))
      caption = meta.get(caption_field) if isinstance(meta, dict) else None
      if not isinstance(caption, str):
        return records.BadRecordError(key, f"missing caption: no txt member and no string {caption_field!r} in json")
      caption = caption.strip()
    else:
      return records.BadRecordError(key, "missing caption: no txt or json member")
  except records.BadRecordError as e:
    return e
  except ValueError as e:
    return records.BadRecordError(f"{key}.json", f"not JSON: {e}")
  return key, image, caption, None


def _read_webdataset(job, options):
  name = os.path.basename(job["tar"])
  current, members = None, {}
  try:
    with tarfile.open(job["tar"], "r:*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, base = os.path.split(member.name)
        stem, _, ext = base.partition(".")
        key = f"{name}:{os.path.join(folder, stem)}"
        if key != current and current is not None:
          yield _wds_sample(current, members, options.caption_field)
          members = {}
        current = key
        members[ext.lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    yield records.BadRecordError(name, f"unreadable tar after {current or 'its start'}: {type(e).__name__}: {e}")
    return
  if current is not None:
    yield _wds_sample(current, members, options.caption_field)


# --- tfds ----------------------------------------------------------------------------------------------------------


def _tfds_builder(options):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if os.path.isfile(os.path.join(options.input, "dataset_info.json")):
    return tfds.builder_from_directory(options.input)
  return tfds.builder(options.input, data_dir=options.tfds_data_dir or None)


def _tfds_dataset(options):
  """(builder, tf.data dataset of the split in order); a split that is not prepared is refused, never downloaded."""
  builder = _tfds_builder(options)
  features = builder.info.features
  for field in (options.image_field, options.caption_field):
    if field not in features:
      raise ValueError(f"TFDS dataset {options.input!r} has no feature {field!r}; it has {sorted(features)}")
  try:
    dataset = builder.as_dataset(split=options.tfds_split, shuffle_files=False)
  except (AssertionError, KeyError, ValueError) as e:
    raise FileNotFoundError(
        f"TFDS dataset {options.input!r} split {options.tfds_split!r} is not prepared under "
        f"--tfds_data_dir={options.tfds_data_dir!r} (convert never downloads): {e}"
    ) from None
  return builder, dataset


def _plan_tfds(options) -> tuple[list[dict], list]:
  _, dataset = _tfds_dataset(options)
  total, n = len(dataset), options.records_per_shard
  source = [options.input, options.tfds_split, options.image_field, options.caption_field, options.caption_template]
  return [
      {"start": s, "end": min(s + n, total), "fingerprint": _fingerprint("tfds", source, s, min(s + n, total))}
      for s in range(0, total, n)
  ], []


def _array_to_png(array: np.ndarray, key: str) -> bytes:
  """A TFDS image array (H, W, C) -> PNG bytes; 16-bit arrays are scaled to 8 bits explicitly, never clipped."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.dtype == np.uint16:
    array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise records.BadRecordError(
        key, f"image array of dtype {array.dtype} and shape {array.shape} is not 8- or " "16-bit gray, RGB or RGBA"
    )
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


def iter_tfds_jobs(jobs, options):
  """Yields (job, list of examples) in order, reading the split once (TFDS cannot be opened per worker cheaply)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder, dataset = _tfds_dataset(options)
  caption_feature = builder.info.features[options.caption_field]
  names = getattr(caption_feature, "names", None)
  examples = iter(tfds.as_numpy(dataset))
  for job in jobs:
    items = []
    for index in range(job["start"], job["end"]):
      example = next(examples)
      key = f"{options.tfds_split}[{index}]"
      try:
        image = _array_to_png(np.asarray(example[options.image_field]), key)
        value = example[options.caption_field]
        if names is not None:
          label = int(value)
          items.append((key, image, options.caption_template.format(label=names[label]), label))
        else:
          items.append((key, image, records.decode_caption(bytes(value), key), None))
      except records.BadRecordError as e:
        items.append(e)
    yield job, items


def _read_tfds(job, options):
  del options
  yield from job["examples"]


PLANNERS = {"imagefolder": _plan_imagefolder, "webdataset": _plan_webdataset, "tfds": _plan_tfds}
READERS = {"imagefolder": _read_imagefolder, "webdataset": _read_webdataset, "tfds": _read_tfds}


def plan(options) -> tuple[list[dict], list]:
  """(jobs, bad inputs found while planning) for `options.format`; raises if the source has no inputs at all."""
  jobs, bad = PLANNERS[options.format](options)
  if not jobs and not bad:
    raise ValueError(f"--input={options.input!r} holds no {options.format} examples (empty source)")
  return jobs, bad


def read_job(job, options):
  """The examples of one job, in order: (key, image bytes, caption, label) tuples or BadRecordError."""
  return READERS[options.format](job, options)
