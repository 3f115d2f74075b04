"""Sampling entry point: one PNG per non-empty prompt line, plus a grid.

  python -m rflow_jax.sample --workdir=runs/quickstart --prompts=prompts.txt --out=OUT [--steps=25] [--cfg=3] [--seed=0]

writes OUT/000000.png, OUT/000001.png, ... (in prompt order) and OUT/grid.png. EMA weights unless --raw.
"""

import os
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).", required=True)
flags.DEFINE_string("prompts", None, "UTF-8 text file, one prompt per line (empty lines skipped).", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("steps", None, "ODE steps (default: the run's sample.num_steps).")
flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the run's sample.cfg_scale).")
flags.DEFINE_integer("seed", 0, "Noise seed; image i uses fold_in(seed, i).")
flags.DEFINE_bool("raw", False, "Use the raw (non-EMA) parameters.")
FLAGS = flags.FLAGS


def read_prompts(path: str) -> list[str]:
  """Non-empty, stripped lines of a UTF-8 file; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path!r}: no such file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts={path!r} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
  prompts = [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"--prompts={path!r} holds no non-empty line")
  return prompts


def main(argv):
  del argv
  from rflow_jax import cli  # pylint: disable=g-import-not-at-top
  from rflow_jax.sampling import pipeline  # pylint: disable=g-import-not-at-top
  with cli.clean_errors():
    prompts = read_prompts(FLAGS.prompts)  # Before loading or compiling anything.
    sampler, params, text_params, _, step = cli.load_sampler(
        FLAGS.workdir, steps=FLAGS.steps, cfg=FLAGS.cfg, use_ema=not FLAGS.raw)
    images = sampler.generate(params, text_params, prompts, FLAGS.seed)
    os.makedirs(FLAGS.out, exist_ok=True)
    for i, image in enumerate(images):
      pipeline.save_png(image, os.path.join(FLAGS.out, f"{i:06d}.png"))
    pipeline.save_png(pipeline.make_grid(images), os.path.join(FLAGS.out, "grid.png"))
  print(f"wrote {len(images)} images (checkpoint step {step}) to {FLAGS.out}")


if __name__ == "__main__":
  from rflow_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=_cli.parse_flags)
