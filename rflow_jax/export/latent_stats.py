"""Latent statistics of a VAE: the shift and scale of the latent normalisation, measured as SD3 measured its own.

  python -m rflow_jax.export.latent_stats --vae=runs/shapes_vae --out=runs/shapes_vae_export [--num_examples=2048]
  python -m rflow_jax.export.latent_stats --vae=path/to/AutoencoderKL_dir [--image_size=64] [--out=COPY]

Encodes the first `num_examples` records of the data set, draws a latent from each posterior (what the MM-DiT will
train on), and takes the mean and standard deviation over every latent element: shift_factor = mean,
scaling_factor = 1 / std, so z = (x - shift) * scale has zero mean and unit variance over the data (arXiv 2403.03206
§5.2.1 normalises SD3's latents this way). Prints one JSON line.

--vae is a training workdir of the "vae" task (its config gives the model and the data; the EMA weights are used
unless --params=raw) or a diffusers AutoencoderKL directory (data: the built-in shapes set at --image_size). The
factors are written into the VAE's export: --out receives a diffusers AutoencoderKL directory (required for a
workdir; for a diffusers directory, without --out its config.json is updated in place, atomically).
"""

import json
import os

from absl import app, flags
import numpy as np

from rflow_jax import cli, rundir
from rflow_jax.data import pixels, registry, shapes
from rflow_jax.export import vae as export_vae

flags.DEFINE_string("vae", None, "A 'vae' training workdir or a diffusers AutoencoderKL directory.", required=True)
flags.DEFINE_string("out", None, "Where the export with the measured factors goes (see the module docstring).")
flags.DEFINE_integer("num_examples", 2048, "Records encoded (the first N of the data set).")
flags.DEFINE_integer("batch_size", 32, "Images per encoder call.")
flags.DEFINE_integer("image_size", 64, "Image side for a diffusers VAE directory (shapes supports 32 and 64+).")
flags.DEFINE_integer("seed", 0, "Seed of the posterior samples.")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Workdir weights: EMA (default) or raw.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
FLAGS = flags.FLAGS


def measure(model, params, images, *, batch_size: int, seed: int) -> dict[str, float]:
  """Mean and std of posterior samples over `images` ((N, S, S, C) float32 in [-1, 1]).

  Returns:
    {"mean", "std", "shift_factor", "scaling_factor", "num_examples"}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from rflow_jax.model import vae as vae_lib  # pylint: disable=g-import-not-at-top

  @jax.jit
  def sample(p, x, key):
    mean, logvar = model.apply({"params": p}, x, method="encode")
    return vae_lib.sample_posterior(mean, logvar, key)

  total = total_sq = count = 0.0
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    z = np.asarray(sample(params, chunk, jax.random.fold_in(jax.random.key(seed), i)), np.float64)
    total, total_sq, count = total + z.sum(), total_sq + (z**2).sum(), count + z.size
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
  if not std > 0:
    raise ValueError(f"the latents of {len(images)} images have standard deviation {std}: no scale can be derived")
  return {"mean": mean, "std": std, "shift_factor": mean, "scaling_factor": 1.0 / std, "num_examples": len(images)}


def _images(source, num_examples: int) -> np.ndarray:
  """The first `num_examples` records' images, float32 in [-1, 1]."""
  if num_examples > len(source):
    raise ValueError(f"--num_examples={num_examples} exceeds the data set's {len(source)} records")
  return pixels.to_float(np.stack([np.asarray(source[i]["image"]) for i in range(num_examples)]))


def main(argv):
  del argv
  with cli.clean_errors():
    if FLAGS.num_examples < 1 or FLAGS.batch_size < 1:
      raise ValueError(f"--num_examples={FLAGS.num_examples} and --batch_size={FLAGS.batch_size} must be >= 1")
    is_workdir = os.path.isfile(os.path.join(FLAGS.vae, "config.json")) and os.path.isdir(
        os.path.join(FLAGS.vae, "checkpoints")
    )
    if is_workdir:
      if not FLAGS.out:
        raise ValueError(f"--vae={FLAGS.vae!r} is a training workdir: pass --out=DIR for the exported VAE")
      model, params, data_config = rundir.load_vae_workdir(FLAGS.vae, use_ema=FLAGS.params == "ema")
      source = registry.make_source(data_config)
    else:
      model, params = export_vae.load_vae(FLAGS.vae)
      source = shapes.ShapesSource(size=FLAGS.image_size)
    model.check_image_size(source.size, source.size)  # Before anything is encoded.
    stats = measure(model, params, _images(source, FLAGS.num_examples), batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    model = model.clone(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    if FLAGS.out:
      export_vae.save_vae(params, model, FLAGS.out, overwrite=FLAGS.overwrite)
    else:
      export_vae.set_latent_factors(FLAGS.vae, stats["scaling_factor"], stats["shift_factor"])
  print(json.dumps({**stats, "written_to": FLAGS.out or FLAGS.vae}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
