"""Reads a converted dataset (python -m rflow_jax.data.convert) in one process and prints one JSON line.

  python benchmarks/data_read.py --path=DIR [--image_size=32] [--reads=2000]
  python benchmarks/data_read.py  # No --path: converts 256 shapes images (64x64 PNG) into a temporary folder first.

Reports records/s of the raw ArrayRecord reads (random order, msgpack decode) and of the training source's full
record (decode, resize, centre crop to image_size), one thread.
"""

import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `launch` importable from any cwd.
from launch import shapes_folder  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("path", "", "Converted dataset directory ('' = make a 256-image shapes folder and convert it).")
flags.DEFINE_integer("image_size", 32, "Side of the served images.")
flags.DEFINE_integer("reads", 2000, "Random reads timed per measurement.")
FLAGS = flags.FLAGS


def _shapes_dataset(directory: str) -> str:
  from rflow_jax.data import convert  # pylint: disable=g-import-not-at-top

  folder = shapes_folder.write(os.path.join(directory, "images"), 256, size=64, caption_style="sentence")
  out = os.path.join(directory, "converted")
  convert.convert(convert.Options("imagefolder", folder, out, records_per_shard=64))
  return out


def _rate(fn, indices) -> float:
  t = time.perf_counter()
  for i in indices:
    fn(int(i))
  return len(indices) / (time.perf_counter() - t)


def main(argv):
  del argv
  import grain  # pylint: disable=g-import-not-at-top
  from rflow_jax.data import arrayrecord, records  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = FLAGS.path or _shapes_dataset(tmp)
    t = time.perf_counter()
    source = arrayrecord.ArrayRecordImageSource(path, FLAGS.image_size)  # Includes the sha256 of every shard.
    open_s = time.perf_counter() - t
    manifest = records.load_manifest(path)
    raw = grain.sources.ArrayRecordDataSource(
        [os.path.join(path, s["file"]) for s in manifest["shards"] if s["num_records"]]
    )
    indices = np.random.default_rng(0).integers(0, len(source), FLAGS.reads)
    raw_rate = _rate(lambda i: records.decode_record(raw[i]), indices)
    source_rate = _rate(source.__getitem__, indices)
    print(
        json.dumps(
            {
                "num_records": len(source),
                "image_size": FLAGS.image_size,
                "stored_sizes": manifest["image_sizes"]["most_common"],
                "open_and_verify_s": round(open_s, 3),
                "raw_records_per_s": round(raw_rate, 1),
                "source_records_per_s": round(source_rate, 1),
                "threads": 1,
            }
        )
    )


if __name__ == "__main__":
  app.run(main)
