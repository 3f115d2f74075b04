"""Sampling entry point: one PNG per non-empty prompt line, plus a grid.

  python -m rflow_jax.sample --workdir=runs/quickstart --prompts=prompts.txt --out=OUT [--steps=25] [--cfg=3] \
      [--solver=euler_stochastic] [--seed=0]

writes OUT/000000.png, OUT/000001.png, ... (in prompt order), OUT/grid.png and OUT/rflow_jax_samples.json (the
prompts and settings). EMA weights unless --raw. OUT must be absent or empty, or an earlier sampling output with
--overwrite (replaced as a whole, never mixed); it may not lie in a training workdir (rflow_jax/paths.py).

With --transformer=DIR (a diffusers SD3Transformer2DModel directory, e.g. OUT/transformer of `python -m
rflow_jax.export`), DIR's weights and architecture replace the run's MM-DiT; --workdir still supplies the config
(sampling settings, formulation, image size) and the frozen text encoders from its checkpoint.
"""

import json
import os
import sys

from absl import app, flags

from rflow_jax import cli
from rflow_jax import paths
from rflow_jax import rundir
from rflow_jax.sampling import pipeline

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).", required=True)
flags.DEFINE_string("prompts", None, "UTF-8 text file, one prompt per line (empty lines skipped).", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's sample.num_steps).")
flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the run's sample.cfg_scale).")
flags.DEFINE_string("solver", None, "Sampler (default: the run's sample.solver); rflow_jax/sampling/solvers.py.")
flags.DEFINE_integer("seed", 0, "Noise seed; image i uses fold_in(seed, i).")
flags.DEFINE_bool("raw", False, "Use the raw (non-EMA) parameters.")
flags.DEFINE_string(
    "transformer",
    None,
    "diffusers transformer directory to sample with instead of the workdir's "
    "MM-DiT weights (the workdir still gives the config and the text encoders).",
)
flags.DEFINE_bool("overwrite", False, "Replace --out when it holds an earlier sampling output.")
FLAGS = flags.FLAGS
MARKER = "rflow_jax_samples.json"  # In every output directory: what was sampled, and the mark --overwrite needs.


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
  cli.quiet_orbax()
  with cli.clean_errors():
    prompts = read_prompts(FLAGS.prompts)  # Before loading or compiling anything.
    out = paths.check_output_dir(FLAGS.out, marker=MARKER, overwrite=FLAGS.overwrite)
    if FLAGS.raw and FLAGS.transformer:
      raise ValueError("--raw selects the workdir's MM-DiT weights; it has no meaning with --transformer")
    sampler, params, text_params, _, step = rundir.load_sampler(
        FLAGS.workdir,
        steps=FLAGS.steps,
        cfg=FLAGS.cfg,
        solver=FLAGS.solver,
        use_ema=not FLAGS.raw,
        transformer=FLAGS.transformer,
    )
    for i, prompt in enumerate(prompts):  # Say what the model will not see, instead of dropping it silently.
      for problem in sampler.tokenizer.problems(prompt):
        print(f"warning: prompt {i + 1} ({prompt!r}): {problem}", file=sys.stderr)
    images = sampler.generate(params, text_params, prompts, FLAGS.seed)
    with paths.staged_dir(out) as staged:
      for i, image in enumerate(images):
        pipeline.save_png(image, os.path.join(staged, f"{i:06d}.png"))
      pipeline.save_png(pipeline.make_grid(images), os.path.join(staged, "grid.png"))
      with open(os.path.join(staged, MARKER), "w") as f:
        json.dump(
            {
                "workdir": os.path.abspath(FLAGS.workdir),
                "step": int(step),
                "seed": FLAGS.seed,
                "raw": FLAGS.raw,
                "transformer": FLAGS.transformer,
                "prompts": prompts,
            },
            f,
            indent=2,
        )
  print(f"wrote {len(images)} images (checkpoint step {step}) to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
