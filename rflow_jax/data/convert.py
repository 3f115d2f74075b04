"""Converts an image-caption source into ArrayRecord shards plus a manifest (the input of `data.name="arrayrecord"`).

  python -m rflow_jax.data.convert --format=imagefolder --input=my_images --out=data/my_images [--workers=8]
  python -m rflow_jax.data.convert --format=webdataset --input=laion_tars/ --out=data/laion
  python -m rflow_jax.data.convert --format=tfds --input=oxford_flowers102 --tfds_data_dir=~/tensorflow_datasets \
      --caption_template="a photo of a {label}, a type of flower" --out=data/flowers

Formats: rflow_jax/data/ingest.py; record and manifest schema: rflow_jax/data/records.py and docs/data.md.

Output: OUT/images-KKKKK-of-NNNNN.arrayrecord (one record per example, "group_size:1" for random access), beside
each a `.json` note of the finished shard (its sha256, record count, bad inputs), then OUT/bad_records.jsonl and
OUT/manifest.json, written last. A shard is written under a temporary name and renamed when complete; re-running
the same command skips every shard whose note matches its inputs and whose file still has the noted sha256, so a
killed conversion resumes and ends bitwise identical to an uninterrupted one.

Bad inputs (undecodable or truncated image, unsupported pixel mode, image below --min_size, missing or non-UTF-8
caption): with --on_bad_record=fail (default) the first one in source order stops the job, exit 2, one line naming
it and why; with --on_bad_record=skip each goes to OUT/bad_records.jsonl with its reason and is counted in the
manifest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import json
import multiprocessing
import os

from absl import app, flags

from rflow_jax.data import ingest, records

SHARD_PREFIX = "images"
MAX_SIZE_COUNTS = 32  # Most common (width, height) pairs listed in the manifest.


@dataclasses.dataclass(frozen=True)
class Options:
  """What to convert and how (the command's flags)."""

  format: str
  input: str
  out: str
  workers: int = 1
  records_per_shard: int = 1000
  min_size: int = 0
  on_bad_record: str = "fail"
  caption_field: str = ""  # "" = the format's default (ingest.DEFAULT_CAPTION_FIELD).
  caption_template: str = "a photo of a {label}"
  image_field: str = "image"
  tfds_split: str = "train"
  tfds_data_dir: str = ""

  def resolved(self) -> Options:
    """Checks the values and fills the format's default caption field; raises ValueError naming a bad one."""
    if self.format not in ingest.PLANNERS:
      raise ValueError(f"--format={self.format!r}; valid: {sorted(ingest.PLANNERS)}")
    if not self.input or not self.out:
      raise ValueError("--input and --out are required")
    for name in ("workers", "records_per_shard"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    if self.min_size < 0:
      raise ValueError(f"--min_size={self.min_size} must be >= 0")
    if self.on_bad_record not in ("skip", "fail"):
      raise ValueError(f"--on_bad_record={self.on_bad_record!r}; valid: 'skip', 'fail'")
    if "{label}" not in self.caption_template:
      raise ValueError(f"--caption_template={self.caption_template!r} has no {{label}} to put the class name in")
    return dataclasses.replace(self, caption_field=self.caption_field or ingest.DEFAULT_CAPTION_FIELD[self.format])

  def record_options(self) -> dict:
    """The options that change a shard's content (part of every shard's fingerprint)."""
    return {
        "format_version": records.FORMAT_VERSION,
        "min_size": self.min_size,
        "caption_field": self.caption_field,
        "caption_template": self.caption_template,
        "image_field": self.image_field,
        "tfds_split": self.tfds_split,
    }


def shard_name(index: int, count: int) -> str:
  return f"{SHARD_PREFIX}-{index:05d}-of-{count:05d}.arrayrecord"


def write_shard(job: dict, path: str, options: Options) -> dict | records.BadRecordError:
  """Writes one job's records to `path` (via a temporary name), then its note beside it; returns the note.

  Under --on_bad_record=fail the first bad input is returned (not raised: it crosses a process boundary) and
  nothing is left behind, neither at `path` nor under the temporary name.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
  writer = ArrayRecordWriter(tmp, "group_size:1")
  bad, sizes, count, open_ = [], collections.Counter(), 0, True
  try:
    for example in ingest.read_job(job, options):
      if not isinstance(example, records.BadRecordError):
        key, data, caption, label = example
        try:
          data, image_format, width, height, mode = records.normalize_image(data, key, options.min_size)
        except records.BadRecordError as e:
          example = e
      if isinstance(example, records.BadRecordError):
        if options.on_bad_record == "fail":
          return example
        bad.append({"key": example.key, "reason": example.reason})
        continue
      record = {
          "image": data,
          "image_format": image_format,
          "width": width,
          "height": height,
          "caption": caption,
          "key": key,
          "source_mode": mode,
      }
      if label is not None:
        record["label"] = label
      writer.write(records.encode_record(record))
      sizes[f"{width}x{height}"] += 1
      count += 1
    writer.close()
    open_ = False
    sha256 = records.sha256_file(tmp)
    os.replace(tmp, path)
  finally:
    if open_:  # Abandoned (bad input or an exception): no trace of a shard.
      writer.close()
      os.remove(tmp)
  note = {
      "fingerprint": job["fingerprint"],
      "options": options.record_options(),
      "sha256": sha256,
      "num_records": count,
      "bad_records": bad,
      "sizes": dict(sorted(sizes.items())),
  }
  records.write_json_atomic(path + ".json", note)
  return note


def _finished_note(path: str, job: dict, options: Options) -> dict | None:
  """The note of a shard finished by an earlier run with the same inputs and options, if its file is intact."""
  try:
    with open(path + ".json") as f:
      note = json.load(f)
  except (OSError, ValueError):
    return None
  if note.get("fingerprint") != job["fingerprint"] or note.get("options") != options.record_options():
    return None
  if note["bad_records"] and options.on_bad_record == "fail":
    return None  # Written under skip; redoing it under fail reports its first bad input.
  if not os.path.isfile(path) or records.sha256_file(path) != note["sha256"]:
    return None
  return note


def _run_jobs(pending, options):
  """Yields (index, note or BadRecordError) in job order, running up to options.workers shards at once."""
  if options.workers == 1:
    for index, job, path in pending:
      yield index, write_shard(job, path, options)
    return
  # spawn, not fork: the parent may have imported TensorFlow (tfds), whose threads do not survive a fork.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=context) as pool:
    window = collections.deque()
    pending = iter(pending)
    try:
      while True:
        # A bounded window keeps memory flat when jobs carry their examples (tfds).
        while len(window) < 2 * options.workers and (item := next(pending, None)) is not None:
          index, job, path = item
          window.append((index, pool.submit(write_shard, job, path, options)))
        if not window:
          return
        index, future = window.popleft()
        yield index, future.result()
    finally:
      pool.shutdown(cancel_futures=True)


def _pending_with_examples(pending, jobs, options):
  """tfds jobs get their examples from the one reader of the split, in order; other formats read in the worker."""
  if options.format != "tfds":
    yield from pending
    return
  paths = {index: path for index, _, path in pending}
  last = max(paths, default=-1)  # Reads the split up to the last shard still to write, no further.
  for index, (job, examples) in enumerate(ingest.iter_tfds_jobs(jobs[: last + 1], options)):
    if index in paths:
      yield index, dict(job, examples=examples), paths[index]


def _size_summary(notes) -> dict:
  counts = collections.Counter()
  for note in notes:
    counts.update(note["sizes"])
  if not counts:
    return {}
  sizes = [tuple(map(int, s.split("x"))) for s in counts]
  common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SIZE_COUNTS]
  return {
      "min_width": min(w for w, _ in sizes),
      "max_width": max(w for w, _ in sizes),
      "min_height": min(h for _, h in sizes),
      "max_height": max(h for _, h in sizes),
      "distinct": len(counts),
      "most_common": dict(common),
  }


def convert(options: Options) -> dict:
  """Converts `options.input` into shards and a manifest under `options.out`; returns the manifest.

  Raises:
    records.BadRecordError: the first bad input, under on_bad_record="fail".
    ValueError, FileNotFoundError: an empty or missing source, bad options.
  """
  options = options.resolved()
  jobs, plan_bad = ingest.plan(options)
  if plan_bad and options.on_bad_record == "fail":
    raise plan_bad[0]
  out = options.out
  os.makedirs(out, exist_ok=True)
  for stale in glob.glob(os.path.join(out, ".*.tmp-*")):  # Left by a killed run; never listed anywhere.
    os.remove(stale)
  paths = [os.path.join(out, shard_name(i, len(jobs))) for i in range(len(jobs))]
  notes = {i: _finished_note(paths[i], job, options) for i, job in enumerate(jobs)}
  pending = [(i, job, paths[i]) for i, job in enumerate(jobs) if notes[i] is None]
  if pending and os.path.exists(os.path.join(out, records.MANIFEST)):
    os.remove(os.path.join(out, records.MANIFEST))  # It describes other shards than the ones about to be written.
  with contextlib.closing(_run_jobs(_pending_with_examples(pending, jobs, options), options)) as results:
    for index, result in results:
      if isinstance(result, records.BadRecordError):
        raise result
      notes[index] = result
  bad = [{"key": e.key, "reason": e.reason} for e in plan_bad]
  shards, first = [], 0
  for i, path in enumerate(paths):
    note = notes[i]
    bad.extend(note["bad_records"])
    shards.append(
        {
            "file": os.path.basename(path),
            "num_records": note["num_records"],
            "first_index": first,
            "num_bad_records": len(note["bad_records"]),
            "sha256": note["sha256"],
        }
    )
    first += note["num_records"]
  records.write_text_atomic(
      os.path.join(out, records.BAD_RECORDS), "".join(json.dumps(b, sort_keys=True) + "\n" for b in bad)
  )
  if first == 0:  # No manifest: there is nothing to train on.
    raise ValueError(
        f"--input={options.input!r} gave no usable records ({len(bad)} bad inputs: see "
        f"{os.path.join(out, records.BAD_RECORDS)})"
        if bad
        else f"--input={options.input!r} holds no {options.format} examples (empty source)"
    )
  # A TFDS name stays a name; paths are made absolute.
  source_input = (
      options.input if options.format == "tfds" and not os.path.isdir(options.input) else os.path.abspath(options.input)
  )
  source = {
      "format": options.format,
      "input": source_input,
      "records_per_shard": options.records_per_shard,
      **options.record_options(),
  }
  manifest = {
      "format": records.FORMAT,
      "format_version": records.FORMAT_VERSION,
      "source": source,
      "caption_field": options.caption_field,
      "num_records": first,
      "num_bad_records": len(bad),
      "image_sizes": _size_summary(notes.values()),
      "shards": shards,
  }
  records.write_json_atomic(os.path.join(out, records.MANIFEST), manifest)
  return manifest


FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags; defined only when run as a program, so importing this module defines none."""
  flags.DEFINE_enum("format", None, sorted(ingest.PLANNERS), "Input format (rflow_jax/data/ingest.py).")
  flags.DEFINE_string("input", None, "Image folder, .tar file or folder of them, or TFDS name / prepared directory.")
  flags.DEFINE_string("out", None, "Output directory of the shards and manifest.json.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Shards converted at once (processes).")
  flags.DEFINE_integer(
      "records_per_shard",
      1000,
      "Examples per output shard (imagefolder, tfds; webdataset keeps " "one shard per input tar).",
  )
  flags.DEFINE_integer("min_size", 0, "Images whose width or height is below this are bad records (0 = no minimum).")
  flags.DEFINE_enum(
      "on_bad_record",
      "fail",
      ["fail", "skip"],
      "fail: stop at the first bad input (exit 2); skip: " "list each in OUT/bad_records.jsonl and go on.",
  )
  flags.DEFINE_string(
      "caption_field",
      "",
      "metadata.jsonl key (imagefolder, default 'text'), json key (webdataset, "
      "default 'caption') or TFDS feature (default 'label').",
  )
  flags.DEFINE_string("caption_template", "a photo of a {label}", "Caption of a TFDS ClassLabel example.")
  flags.DEFINE_string("image_field", "image", "TFDS image feature.")
  flags.DEFINE_string("tfds_split", "train", "TFDS split (slices such as 'train[:10%]' work).")
  flags.DEFINE_string("tfds_data_dir", "", "Where the TFDS dataset is prepared ('' = TFDS's default).")
  flags.mark_flags_as_required(["format", "input", "out"])


def main(argv):
  del argv
  from rflow_jax import cli  # pylint: disable=g-import-not-at-top
  # By module path, not __main__: the spawned workers unpickle the job function and options from it.
  from rflow_jax.data import convert as lib  # pylint: disable=g-import-not-at-top,import-self

  options = lib.Options(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(lib.Options)})
  with cli.clean_errors():
    manifest = lib.convert(options)
  print(
      json.dumps(
          {
              "out": options.out,
              "num_records": manifest["num_records"],
              "num_bad_records": manifest["num_bad_records"],
              "num_shards": len(manifest["shards"]),
          }
      )
  )


if __name__ == "__main__":
  _define_flags()
  from rflow_jax import cli as _cli  # pylint: disable=g-import-not-at-top

  app.run(main, flags_parser=_cli.parse_flags)
