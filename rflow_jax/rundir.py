"""A training run's directory as library code: its config, its backbone, its weights and a sampler for it.

Sampling, ShapesEval, export and the formulation study read a finished (or running) workdir through this module;
none of them imports the trainer. Weights are restored params only (a partial restore: no optimizer moments).
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from rflow_jax import config_lib
from rflow_jax.export import diffusers as export_diffusers
from rflow_jax.export import diffusers_io
from rflow_jax.export import pipeline as export_pipeline
from rflow_jax.flow import formulations
from rflow_jax.model import mmdit
from rflow_jax.model import registry
from rflow_jax.model import text_encoders
from rflow_jax.sampling import pipeline
from rflow_jax.sharding import mesh as mesh_lib, partition, rules as rules_lib
from rflow_jax.train import checkpoint, latent_data, vae_task

CONFIG_NAME = "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved to WORKDIR/config.json."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no config.json: not a rflow_jax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_sampler(
    workdir: str,
    *,
    steps=None,
    cfg=None,
    solver=None,
    use_ema: bool = True,
    transformer: str | None = None,
    guidance_interval=None,
    skip_layer_guidance=None,
):
  """Rebuilds (sampler, params, text_params, config, step) from a workdir.

  Args:
    workdir: a training workdir (config.json + checkpoints/).
    steps, cfg, solver: overrides of config.sample's num_steps, cfg_scale and solver (None: the run's).
    use_ema: the EMA weights (what training samples with) or the raw ones.
    transformer: a diffusers SD3Transformer2DModel directory whose model and weights replace the workdir's MM-DiT;
      the workdir still gives the config and the text encoders' weights.
    guidance_interval, skip_layer_guidance: see sampling.pipeline.Sampler (None: off).

  Returns:
    The sampler, its backbone params and text params, the config with the overrides, and the checkpoint step.
  """
  config = load_config(workdir)
  if steps is not None:
    config.sample.num_steps = steps
  if cfg is not None:
    config.sample.cfg_scale = cfg
  if solver is not None:
    config.sample.solver = solver
  config.sample.use_ema = use_ema
  config_lib.validate_sampling(config.sample)  # Before restoring or compiling anything.
  model = registry.build_model(config)
  if transformer is not None:  # Checked against the run's text stack before the checkpoint is read.
    model, transformer_params = load_transformer_for(transformer, config)
  params, text_params, step = checkpoint.restore_params(workdir, use_ema=use_ema)
  if transformer is not None:
    params = transformer_params
  tokenizer, text_stack = text_encoders.build(config.text)
  sampler = pipeline.Sampler.from_config(
      config,
      model=model,
      text_stack=text_stack,
      tokenizer=tokenizer,
      vae=latent_data.run_vae(config),  # A latent-space run's samples are decoded.
      guidance_interval=guidance_interval,
      skip_layer_guidance=skip_layer_guidance,
  )
  return sampler, params, text_params, config, step


# A pipeline's sampler runs diffusers' rf velocity field (any rf formulation: only the network's output matters here).
PIPELINE_FORMULATION = "rf"
PIPELINE_BATCH_SIZE = 8  # Prompts per jitted call of `sample --pipeline` (one compile per batch shape).


def load_pipeline_sampler(
    path: str | os.PathLike[str],
    *,
    steps=None,
    cfg=None,
    solver=None,
    size=None,
    t5_length=export_pipeline.DEFAULT_T5_LENGTH,
    use_t5=None,
    guidance_interval=None,
    skip_layer_guidance=None,
    batch_size=PIPELINE_BATCH_SIZE,
    single_file=None,
):
  """(sampler, params, text_params, components) that sample a StableDiffusion3Pipeline directory as diffusers does.

  Every default is StableDiffusion3Pipeline.__call__'s: its steps (28), guidance scale (7.0), T5 length (256), the
  empty negative prompt, the scheduler's σ grid and shift with the Euler step (sample.schedule="diffusers"), the
  image size sample_size · vae_scale_factor, and the latents un-normalised by the VAE's scaling/shift before decoding.

  Args:
    path: the pipeline directory.
    steps, cfg, solver: None: diffusers' defaults (28, 7.0, "euler").
    size: (height, width) in pixels, or None for the pipeline's default; must divide into whole patches of latents.
    t5_length, use_t5: see export.pipeline.load_pipeline.
    guidance_interval: (σ_lo, σ_hi) of classifier-free guidance, or None (always).
    skip_layer_guidance: a guidance.SkipLayerGuidance, or None (off).
    batch_size: prompts per jitted call.
    single_file: a released all-in-one .safetensors whose MM-DiT and VAE replace the directory's.

  Raises:
    PipelineError / FileNotFoundError / ValueError: one line naming the file or the setting, before any compile.
  """
  sample = ml_collections.ConfigDict(
      dict(
          num_steps=export_pipeline.DEFAULT_STEPS if steps is None else steps,
          cfg_scale=export_pipeline.DEFAULT_CFG if cfg is None else cfg,
          solver="euler" if solver is None else solver,
          schedule="diffusers",
          shift=1.0,
          batch_size=batch_size,
          use_ema=True,
      )
  )
  config_lib.validate_sampling(sample)  # Before reading any weight.
  c = export_pipeline.load_pipeline(path, t5_length=t5_length, use_t5=use_t5, single_file=single_file)
  sample.shift = c.shift
  if skip_layer_guidance is not None:
    skip_layer_guidance.check(c.model.depth)
  height, width = (c.default_image_size,) * 2 if size is None else size
  unit = c.vae.downsample_factor * c.model.patch_size
  if height % unit or width % unit:
    raise ValueError(f"image size {height}x{width} must be divisible by vae_scale_factor x patch_size = {unit}")
  f = c.vae.downsample_factor
  if max(height, width) // f // c.model.patch_size > c.model.pos_embed_max_size:
    raise ValueError(
        f"image size {height}x{width} is larger than the transformer's positional table "
        f"(pos_embed_max_size={c.model.pos_embed_max_size} patches of {unit} pixels)"
    )
  sampler = pipeline.Sampler(
      model=c.model,
      text_stack=c.text_stack,
      tokenizer=c.tokenizer,
      formulation=formulations.get(PIPELINE_FORMULATION),
      sample_config=sample,
      image_shape=(height // f, width // f, c.model.in_channels),
      vae=(c.vae, c.vae_params),
      guidance_interval=guidance_interval,
      skip_layer_guidance=skip_layer_guidance,
  )
  return sampler, c.params, c.text_params, c


def shard_pipeline(components, params, text_params, devices=None):
  """(params, text_params, mesh): a pipeline's MM-DiT and text encoders split over `devices` (default all).

  One fsdp axis over every device with the training rules (rflow_jax/sharding/rules.py), so a model too large for
  one device samples on several; XLA propagates the placement to the activations. A dimension the device count does
  not divide is replicated. The VAE stays a constant of the jitted sampler (small beside the MM-DiT).
  """
  c = components
  mesh = mesh_lib.make_mesh((1, -1, 1), devices=devices)
  rules = rules_lib.get_rules("fsdp")
  key, p, m = jax.random.key(0), c.model.patch_size, c.model
  # Shapes only (eval_shape): the boxes carry each weight's logical axes.
  inputs = (jnp.zeros((1, p, p, m.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, m.context_dim)))
  boxed = jax.eval_shape(c.model.init, key, *inputs, jnp.zeros((1, m.pooled_dim)))["params"]
  tokens = jnp.zeros((1, len(c.tokenizer.batch([""])[0])), jnp.int32)
  text_boxed = jax.eval_shape(c.text_stack.init, key, tokens)["params"]
  return partition.place(params, boxed, mesh, rules), partition.place(text_params, text_boxed, mesh, rules), mesh


def load_transformer_for(path: str | os.PathLike[str], config) -> tuple[mmdit.MMDiT, Any]:
  """A diffusers transformer directory as the MM-DiT of a run's config.

  The compute settings (dtype, attention_impl) come from the config; the architecture comes from the directory and
  must fit the run's text stack (its context and pooled widths), channels and image size.

  Args:
    path: a diffusers SD3Transformer2DModel directory, or a pipeline directory holding one.
    config: the resolved config of the workdir that supplies the text stack.

  Returns:
    (model, params) with host numpy params.

  Raises:
    ValueError: naming the first mismatch between the directory and the run.
  """
  path = diffusers_io.component_dir(path, "transformer")  # A pipeline directory: its transformer/.
  overrides = dict(dtype=registry.DTYPES[config.model.dtype], attention_impl=config.model.attention_impl)
  config_file = path / diffusers_io.CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(
        f"--transformer={str(path)!r} has no {diffusers_io.CONFIG_NAME}: not a diffusers " f"transformer directory"
    )
  # The architecture is checked against the run before any weight is read.
  model = export_diffusers.model_from_diffusers_config(json.loads(config_file.read_text()), **overrides)
  grid = config.data.image_size // model.patch_size
  _, _, context_width, pooled_width = text_encoders.dims(config.text)
  # The widths the run's text stack produces: text.width for the tiny stand-ins, the encoders' own for "sd3".
  width = "text.width" if config.text.encoders == "tiny" else "the sd3 text stack's width"
  checks = [
      ("joint_attention_dim", model.context_dim, width, context_width),
      ("pooled_projection_dim", model.pooled_dim, width, pooled_width),
      ("in_channels", model.in_channels, "model.in_channels", config.model.in_channels),
      ("out_channels", model.output_channels, "model.in_channels", config.model.in_channels),
  ]
  for theirs, value, ours, expected in checks:
    if value != expected:
      raise ValueError(f"--transformer={str(path)!r} has {theirs}={value}, but the workdir's {ours}={expected}")
  if config.data.image_size % model.patch_size or grid > model.pos_embed_max_size:
    raise ValueError(
        f"--transformer={str(path)!r} (patch_size={model.patch_size}, pos_embed_max_size={model.pos_embed_max_size}) "
        f"cannot take the workdir's data.image_size={config.data.image_size}"
    )
  return diffusers_io.load_transformer(path, **overrides)


def load_vae_workdir(workdir: str | os.PathLike[str], use_ema: bool = True):
  """(model, params, data config) of a "vae"-task training workdir's newest checkpoint (EMA weights by default).

  Raises:
    FileNotFoundError / ValueError: not a workdir, no checkpoint, or a workdir of another task.
  """
  config = load_config(str(workdir))
  if config.get("task") != "vae":  # Workdirs written before tasks existed have no `task`: they trained the MM-DiT.
    raise ValueError(f"{workdir} is a training workdir of task {config.get('task', 'flow')!r}, not 'vae'")
  params, _, _ = checkpoint.restore_params(str(workdir), use_ema=use_ema)
  return vae_task.build_model(config), params, config.data
