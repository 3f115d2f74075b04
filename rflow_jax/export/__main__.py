"""Export entry point: a training workdir's MM-DiT as a diffusers directory, a whole StableDiffusion3Pipeline, or a
flat safetensors file.

  python -m rflow_jax.export --workdir=runs/quickstart --out=OUT [--format=diffusers|pipeline|safetensors]
                             [--params=ema|raw] [--overwrite]

diffusers (default): OUT/transformer/ (SD3Transformer2DModel.from_pretrained) + OUT/scheduler/scheduler_config.json
(FlowMatchEulerDiscreteScheduler, the run's sample.shift). pipeline: OUT is a StableDiffusion3Pipeline directory
(StableDiffusion3Pipeline.from_pretrained(OUT)) with the VAE, text encoders and tokenizers; latent-space runs with
text.encoders="sd3" only. safetensors: OUT/params.safetensors, '/'-joined names. All: OUT/rflow_jax_export.json
(model config, step, params). See docs/export.md and rflow_jax/export/workdir.py.
"""

from absl import app, flags

from rflow_jax import cli
from rflow_jax.export import workdir

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).", required=True)
flags.DEFINE_string("out", None, "Output directory (absent or empty unless --overwrite).", required=True)
flags.DEFINE_enum("format", "diffusers", list(workdir.FORMATS), "Export format.")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Which weights: the EMA (what sampling uses) or the raw ones.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_orbax()
  with cli.clean_errors():
    info = workdir.export_workdir(
        FLAGS.workdir, FLAGS.out, fmt=FLAGS.format, params=FLAGS.params, overwrite=FLAGS.overwrite
    )
  print(f"wrote {info['format']} export of checkpoint step {info['step']} ({info['params']} params) to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
