"""Renders built-in `shapes` records to an image folder (PNG + metadata.jsonl captions), the input of convert.

  python -m launch.shapes_folder --out=data/shapes64/images --num_records=20000 [--size=64] [--seed=0]

The folder is what a user's own images look like to `python -m rflow_jax.data.convert --format=imagefolder`, so the
latent quickstart (launch/shapes_latent.sh) and the data benchmarks go through the same path as real data. Record i
is ShapesSource(size, seed)[i] (the procedural set the pixel configs train on), captions in the training mix of
sentence and tag styles unless --caption_style says otherwise. Written to a temporary sibling and renamed, so a
killed run leaves no half folder under --out; an existing --out is kept as it is (re-running is a no-op).
"""

import json
import os
import shutil

from absl import app, flags


def write(out: str, num_records: int, size: int = 64, seed: int = 0, caption_style: str = "mixed") -> str:
  """Writes records 0..num_records-1 to `out` (if it does not exist yet); returns `out`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from rflow_jax.data import shapes  # pylint: disable=g-import-not-at-top

  if os.path.isdir(out):
    return out
  source = shapes.ShapesSource(size=size, seed=seed, num_records=num_records, caption_style=caption_style)
  tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
    for i in range(num_records):
      record = source[i]
      Image.fromarray(record["image"]).save(os.path.join(tmp, f"{i:06d}.png"))
      f.write(json.dumps({"file_name": f"{i:06d}.png", "text": record["caption"]}) + "\n")
  os.replace(tmp, out)
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  print(write(f.out, f.num_records, f.size, f.seed, f.caption_style))


if __name__ == "__main__":
  flags.DEFINE_string("out", None, "Output folder (left as it is when it exists).", required=True)
  flags.DEFINE_integer("num_records", None, "Images to render: records 0 .. num_records - 1.", required=True)
  flags.DEFINE_integer("size", 64, "Image side in pixels (shapes renders 32 and 64).")
  flags.DEFINE_integer("seed", 0, "ShapesSource seed (which scene record i is).")
  flags.DEFINE_string("caption_style", "mixed", "'mixed' (training's 50/50 sentence/tag), 'sentence' or 'tag'.")
  app.run(main)
