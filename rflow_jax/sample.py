"""Sampling entry point: one PNG per non-empty prompt line, plus a grid, from a training run or an SD3 pipeline.

  python -m rflow_jax.sample --workdir=runs/quickstart --prompts=prompts.txt --out=OUT [--steps=25] [--cfg=3] \
      [--solver=euler_stochastic] [--seed=0]
  python -m rflow_jax.sample --pipeline=sd3_dir --prompts=prompts.txt --out=OUT [--steps --cfg --seed --solver] \
      [--latents=noise.npy] [--negative_prompt=...] [--height --width --t5_length --t5] [--single_file=sd3.5.safetensors]

writes OUT/000000.png, OUT/000001.png, ... (in prompt order), OUT/grid.png and OUT/rflow_jax_samples.json (the
prompts and settings). EMA weights unless --raw. OUT must be absent or empty, or an earlier sampling output with
--overwrite (replaced as a whole, never mixed); it may not lie in a training workdir (rflow_jax/paths.py).

With --transformer=DIR (a diffusers SD3Transformer2DModel directory, e.g. OUT/transformer of `python -m
rflow_jax.export`), DIR's weights and architecture replace the run's MM-DiT; --workdir still supplies the config
(sampling settings, formulation, image size) and the frozen text encoders from its checkpoint.

With --pipeline=DIR (a StableDiffusion3Pipeline directory: a release, or `python -m rflow_jax.export
--format=pipeline`), every default is diffusers' StableDiffusion3Pipeline.__call__'s (28 steps, guidance 7.0, T5 length
256, the empty negative prompt, the scheduler's grid and shift with Euler), so the same call gives the same images.
--latents takes the initial noise as diffusers' `latents=` does: (N, C, h, w) float32, NCHW, one per prompt.
The MM-DiT and text encoders are split over every device there is (one fsdp axis, rundir.shard_pipeline), so a
pipeline too large for one device samples on several; the images are the one-device ones (to float rounding).
Guidance options (either mode): --guidance_interval=LO,HI (σ range of classifier-free guidance) and skip-layer
guidance --skip_layers=7,8,9 [--slg_scale --slg_start --slg_stop], diffusers' `skip_guidance_layers` and its defaults.
"""

import json
import os
import sys

from absl import app, flags
import numpy as np

from rflow_jax import cli
from rflow_jax import paths
from rflow_jax import rundir
from rflow_jax.export import pipeline as export_pipeline
from rflow_jax.sampling import guidance, pipeline

_SLG = guidance.SkipLayerGuidance()
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints); or --pipeline.")
flags.DEFINE_string("pipeline", None, "StableDiffusion3Pipeline directory to sample instead of a workdir.")
flags.DEFINE_string("prompts", None, "UTF-8 text file, one prompt per line (empty lines skipped).", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's sample.num_steps; a pipeline: 28).")
flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the run's sample.cfg_scale; a pipeline: 7).")
flags.DEFINE_string("solver", None, "Sampler (default: the run's sample.solver; a pipeline: euler).")
flags.DEFINE_integer("seed", 0, "Noise seed; image i uses fold_in(seed, i).")
flags.DEFINE_string("latents", None, "Initial noise, a .npy of (N, C, h, w) float32 (NCHW, diffusers' latents=).")
flags.DEFINE_string("negative_prompt", None, "Negative prompt of every image (default: the run's / diffusers' '').")
flags.DEFINE_list("guidance_interval", None, "σ_lo,σ_hi: classifier-free guidance only there (default: always).")
flags.DEFINE_list("skip_layers", None, "Skip-layer guidance: joint blocks to skip (diffusers' skip_guidance_layers).")
flags.DEFINE_float("slg_scale", _SLG.scale, "Skip-layer guidance scale (skip_layer_guidance_scale).")
flags.DEFINE_float("slg_start", _SLG.start, "Skip-layer guidance from this fraction of the steps (exclusive).")
flags.DEFINE_float("slg_stop", _SLG.stop, "Skip-layer guidance up to this fraction of the steps (exclusive).")
flags.DEFINE_string(
    "single_file", None, "--pipeline: a released all-in-one .safetensors (MM-DiT + VAE) to use instead."
)
flags.DEFINE_integer("height", None, "--pipeline: image height in pixels (default: the pipeline's).")
flags.DEFINE_integer("width", None, "--pipeline: image width in pixels (default: the pipeline's).")
flags.DEFINE_integer("t5_length", export_pipeline.DEFAULT_T5_LENGTH, "--pipeline: T5 tokens (max_sequence_length).")
flags.DEFINE_bool("t5", None, "--pipeline: use T5 (default: when the pipeline has text_encoder_3).")
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


def read_latents(path: str, count: int) -> np.ndarray:
  """The --latents file: (count, C, h, w) float32 (never unpickled); errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--latents={path!r}: no such file")
  try:
    latents = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f"--latents={path!r} is not a .npy array ({str(e).splitlines()[0]})") from None
  if not isinstance(latents, np.ndarray):
    raise ValueError(f"--latents={path!r} is a .npz archive, not a .npy array")
  if latents.dtype != np.float32:
    raise ValueError(f"--latents={path!r} has dtype {latents.dtype}, expected float32 (diffusers' latents)")
  if latents.ndim != 4 or latents.shape[0] != count:
    raise ValueError(f"--latents={path!r} has shape {latents.shape}, expected ({count}, C, h, w): one per prompt, NCHW")
  return latents


def check_latents(path: str, latents: np.ndarray, latent_shape) -> np.ndarray:
  """NCHW latents checked against the sampler's (h, w, C) and returned NHWC."""
  h, w, c = latent_shape
  if latents.shape[1:] != (c, h, w):
    raise ValueError(f"--latents={path!r} has shape {latents.shape}, expected {(latents.shape[0], c, h, w)} (NCHW)")
  return np.ascontiguousarray(latents.transpose(0, 2, 3, 1))


def _guidance_flags():
  interval = None
  if FLAGS.guidance_interval is not None:
    try:
      interval = tuple(float(v) for v in FLAGS.guidance_interval)
    except ValueError:
      interval = ()
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1]:
      raise ValueError(
          f"--guidance_interval={','.join(FLAGS.guidance_interval)}: expected two σ values lo,hi, lo <= hi"
      )
  slg = None
  if FLAGS.skip_layers:
    try:
      layers = tuple(int(v) for v in FLAGS.skip_layers)
    except ValueError:
      raise ValueError(f"--skip_layers={','.join(FLAGS.skip_layers)}: expected block indices, e.g. 7,8,9") from None
    slg = guidance.SkipLayerGuidance(layers, FLAGS.slg_scale, FLAGS.slg_start, FLAGS.slg_stop)
    slg.check()  # Each field's range now; the layers against the model once it is read.
  return interval, slg


def main(argv):
  del argv
  cli.quiet_orbax()
  with cli.clean_errors():
    if (FLAGS.workdir is None) == (FLAGS.pipeline is None):
      raise ValueError("give exactly one of --workdir (a training run) and --pipeline (a StableDiffusion3Pipeline)")
    if FLAGS.pipeline is not None:
      bad = [f"--{n}" for n in ("raw", "transformer") if FLAGS[n].present]
      if bad:
        raise ValueError(f"{bad[0]} selects a workdir's weights; it has no meaning with --pipeline")
    else:
      bad = [f"--{n}" for n in ("height", "width", "t5_length", "t5", "single_file") if FLAGS[n].present]
      if bad:
        raise ValueError(f"{bad[0]} is a --pipeline setting; a workdir's sampling follows its config")
    prompts = read_prompts(FLAGS.prompts)  # Before loading or compiling anything.
    latents = None if FLAGS.latents is None else read_latents(FLAGS.latents, len(prompts))
    interval, slg = _guidance_flags()
    out = paths.check_output_dir(FLAGS.out, marker=MARKER, overwrite=FLAGS.overwrite)
    if FLAGS.raw and FLAGS.transformer:
      raise ValueError("--raw selects the workdir's MM-DiT weights; it has no meaning with --transformer")
    if FLAGS.pipeline is not None:
      size = None
      if FLAGS.height is not None or FLAGS.width is not None:
        if FLAGS.height is None or FLAGS.width is None:
          raise ValueError("give both --height and --width, or neither (the pipeline's default size)")
        size = (FLAGS.height, FLAGS.width)
      sampler, params, text_params, components = rundir.load_pipeline_sampler(
          FLAGS.pipeline,
          steps=FLAGS.steps,
          cfg=FLAGS.cfg,
          solver=FLAGS.solver,
          size=size,
          t5_length=FLAGS.t5_length,
          use_t5=FLAGS.t5,
          guidance_interval=interval,
          skip_layer_guidance=slg,
          single_file=FLAGS.single_file,
      )
      params, text_params, _ = rundir.shard_pipeline(components, params, text_params)  # Over every device.
      step, negative = None, export_pipeline.DEFAULT_NEGATIVE_PROMPT
    else:
      sampler, params, text_params, _, step = rundir.load_sampler(
          FLAGS.workdir,
          steps=FLAGS.steps,
          cfg=FLAGS.cfg,
          solver=FLAGS.solver,
          use_ema=not FLAGS.raw,
          transformer=FLAGS.transformer,
          guidance_interval=interval,
          skip_layer_guidance=slg,
      )
      step, negative = int(step), None
    if FLAGS.negative_prompt is not None:
      negative = FLAGS.negative_prompt
    noise = None if latents is None else check_latents(FLAGS.latents, latents, sampler.latent_shape)
    for i, prompt in enumerate(prompts):  # Say what the model will not see, instead of dropping it silently.
      for problem in sampler.tokenizer.problems(prompt):
        print(f"warning: prompt {i + 1} ({prompt!r}): {problem}", file=sys.stderr)
    images = sampler.generate(
        params,
        text_params,
        prompts,
        FLAGS.seed,
        noise=noise,
        negative_prompts=None if negative is None else [negative] * len(prompts),
    )
    with paths.staged_dir(out) as staged:
      for i, image in enumerate(images):
        pipeline.save_png(image, os.path.join(staged, f"{i:06d}.png"))
      pipeline.save_png(pipeline.make_grid(images), os.path.join(staged, "grid.png"))
      with open(os.path.join(staged, MARKER), "w") as f:
        json.dump(
            {
                "workdir": FLAGS.workdir and os.path.abspath(FLAGS.workdir),
                "pipeline": FLAGS.pipeline and os.path.abspath(FLAGS.pipeline),
                "step": step,
                "seed": FLAGS.seed,
                "latents": FLAGS.latents,
                "negative_prompt": negative,
                "raw": FLAGS.raw,
                "transformer": FLAGS.transformer,
                "prompts": prompts,
            },
            f,
            indent=2,
        )
  where = f"checkpoint step {step}" if step is not None else f"pipeline {FLAGS.pipeline}"
  print(f"wrote {len(images)} images ({where}) to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
