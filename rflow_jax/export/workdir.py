"""Export of a training run: its backbone as a diffusers directory or flat safetensors, or the whole pipeline.

The library behind `python -m rflow_jax.export` (a test or a notebook calls
`export_workdir` the same way). Three formats:

  diffusers    OUT/transformer/ (config.json and
               diffusion_pytorch_model.safetensors, loaded by
               SD3Transformer2DModel.from_pretrained) and
               OUT/scheduler/scheduler_config.json (FlowMatchEulerDiscrete-
               Scheduler, num_train_timesteps 1000, the run's `sample.shift`).
               Only for rf (velocity-output) formulations: that scheduler
               integrates a velocity field with timestep = 1000·sigma.
  pipeline     OUT is a StableDiffusion3Pipeline directory (model_index.json,
               transformer/, vae/ with the run's scaling/shift, the three
               text encoders and tokenizers, scheduler/): rflow_jax/export/
               pipeline.py. Only for latent-space runs with text.encoders="sd3";
               any other run is refused with the part it lacks.
  safetensors  OUT/params.safetensors: the param tree as is, names joined
               with '/' (e.g. "blocks_0/x/attn/qkv/kernel"), for any run.

All write OUT/rflow_jax_export.json: the backbone's arch and constructor
arguments, the checkpoint step, which params (ema/raw), the formulation and
the sampling settings; `load_flat` rebuilds (model, params) from a
safetensors export with it. Runs of the RQ2 baselines (config.model.arch, see
rflow_jax.model.baselines) export as safetensors only.

OUT is written to a temporary sibling directory and renamed into place, so an
interrupted export leaves no partial OUT. The diffusers format has no text
encoders; `python -m rflow_jax.sample --workdir=W
--transformer=OUT/transformer` samples with it and the run's text stack.
"""

import json
import os
import pathlib
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from rflow_jax import paths
from rflow_jax import rundir
from rflow_jax.export import diffusers_io
from rflow_jax.export import pipeline as export_pipeline
from rflow_jax.flow import formulations
from rflow_jax.model import registry
from rflow_jax.model import text_encoders
from rflow_jax.train import checkpoint, latent_data

FORMATS = ("diffusers", "pipeline", "safetensors")
PARAM_CHOICES = ("ema", "raw")
TRANSFORMER_DIR = "transformer"
SCHEDULER_DIR = export_pipeline.SCHEDULER_DIR
SCHEDULER_CONFIG_NAME = export_pipeline.SCHEDULER_CONFIG_NAME
FLAT_WEIGHTS_NAME = "params.safetensors"
INFO_NAME = "rflow_jax_export.json"


# Where it is defined: the pipeline export writes the same scheduler (kept here for callers of the diffusers format).
scheduler_config = export_pipeline.scheduler_config


def model_config(config) -> tuple[str, dict[str, Any]]:
  """(arch, JSON-able constructor arguments) of a run's backbone.

  The dtype is stored by name.
  """
  kwargs = registry.model_kwargs(config)
  arch = config.model.arch
  kwargs["dtype"] = config.model.dtype
  return arch, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def model_from_config(arch: str, kwargs: dict[str, Any]) -> nn.Module:
  """Inverse of `model_config`: the backbone (MMDiT or an RQ2 baseline)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if kwargs.get("dtype") not in registry.DTYPES:
    raise ValueError(f"model dtype {kwargs.get('dtype')!r} is not one of " f"{sorted(registry.DTYPES)}")
  kwargs["dtype"] = registry.DTYPES[kwargs["dtype"]]
  return registry.build(arch, **kwargs)


def save_flat(params: Any, path: str | os.PathLike[str]) -> None:
  """Writes a param tree as one safetensors file with '/'-joined names.

  Args:
    params: nested dict of arrays (boxed or not, device or host).
    path: the .safetensors file to write.
  """
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  tensors = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()}
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "flax"})


def load_flat(out_dir: str | os.PathLike[str]) -> tuple[nn.Module, Any, dict[str, Any]]:
  """(backbone, nested numpy params, export info) of a safetensors export."""
  out_dir = pathlib.Path(out_dir)
  info = json.loads((out_dir / INFO_NAME).read_text())
  params = safetensors.numpy.load_file(str(out_dir / FLAT_WEIGHTS_NAME))
  return (model_from_config(info["arch"], info["model"]), flax.traverse_util.unflatten_dict(params, sep="/"), info)


def check_pipeline_run(config) -> None:
  """Raises ValueError naming the part a run lacks to be a StableDiffusion3Pipeline (before any weight is read)."""
  if config.text.encoders != "sd3":
    raise ValueError(
        f"text.encoders={config.text.encoders!r}: the run's stand-in text encoders have no text_encoder/ (CLIP-L), "
        "text_encoder_2/ (CLIP-G) or text_encoder_3/ (T5) to export, so it cannot be a pipeline; use --format=diffusers"
    )
  if config.data.name != "precomputed":
    raise ValueError(
        f"data.name={config.data.name!r} trains in pixel space: the run has no VAE (vae/) to export, so it cannot be "
        "a pipeline; use --format=diffusers"
    )


def pipeline_components(config, model, weights, text_params) -> export_pipeline.Components:
  """A latent-space "sd3"-text run's checkpoint weights as a pipeline's components (its VAE with the run's factors)."""
  vae, vae_params = latent_data.run_vae(config)
  tokenizer, stack = text_encoders.build(config.text)
  return export_pipeline.Components(
      model=model,
      params=weights,
      vae=vae,
      vae_params=vae_params,
      tokenizer=tokenizer,
      text_stack=stack,
      text_params=text_params,
      shift=config.sample.shift,
      sample_size=config.data.image_size,
  )


def export_workdir(
    workdir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fmt: str = "diffusers",
    params: str = "ema",
    overwrite: bool = False,
) -> dict[str, Any]:
  """Exports the newest checkpoint of a training workdir.

  Args:
    workdir: a training workdir (config.json + checkpoints/).
    out: output directory; must be absent or empty unless overwrite.
    fmt: one of FORMATS.
    params: "ema" (the EMA weights, what sampling uses) or "raw".
    overwrite: replace an existing non-empty out.

  Returns:
    The export info also written to OUT/rflow_jax_export.json.

  Raises:
    ValueError / FileNotFoundError: naming the bad argument (missing workdir
      or checkpoint, occupied out, a non-rf run exported as diffusers).
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r} is not one of {list(FORMATS)}")
  if params not in PARAM_CHOICES:
    raise ValueError(f"--params={params!r} is not one of " f"{list(PARAM_CHOICES)}")
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  if not workdir.is_dir():
    raise FileNotFoundError(f"--workdir={str(workdir)!r} is not a directory")
  config = rundir.load_config(str(workdir))
  out = pathlib.Path(paths.check_output_dir(out, marker=INFO_NAME, overwrite=overwrite))  # Before any restore.
  formulation = formulations.get(config.flow.formulation, shift=config.flow.shift)
  if fmt != "safetensors" and formulation.output != formulations.VELOCITY:
    raise ValueError(
        f"flow.formulation={config.flow.formulation!r} predicts "
        f"{formulation.output!r}, not the rf velocity that diffusers' "
        f"FlowMatchEulerDiscreteScheduler integrates; use --format=safetensors"
    )
  arch, kwargs = model_config(config)
  if fmt != "safetensors" and arch != "mmdit":
    raise ValueError(
        f"model.arch={arch!r}: only the MM-DiT has a diffusers "
        f"equivalent (SD3Transformer2DModel); use "
        f"--format=safetensors"
    )
  if fmt == "pipeline":
    check_pipeline_run(config)
  model = model_from_config(arch, kwargs)
  weights, text_params, step = checkpoint.restore_params(str(workdir), use_ema=params == "ema")
  info = {
      "format": fmt,
      "workdir": str(workdir.resolve()),
      "step": int(step),
      "params": params,
      "arch": arch,
      "model": kwargs,
      "flow": {"formulation": formulation.name, "shift": config.flow.shift},
      "text": {"encoders": config.text.encoders, "t5_length": config.text.t5_length, "use_t5": config.text.use_t5},
      "sample": {
          "shift": config.sample.shift,
          "num_steps": config.sample.num_steps,
          "cfg_scale": config.sample.cfg_scale,
      },
  }
  with paths.staged_dir(str(out)) as staged:  # Readable (umask), atomic, no partial OUT.
    tmp = pathlib.Path(staged)
    if fmt == "diffusers":
      diffusers_io.save_transformer(weights, model, tmp / TRANSFORMER_DIR, sample_size=config.data.image_size)
      export_pipeline.write_scheduler(tmp, config.sample.shift)
    elif fmt == "pipeline":
      export_pipeline.write_pipeline(tmp, pipeline_components(config, model, weights, text_params))
    else:
      save_flat(weights, tmp / FLAT_WEIGHTS_NAME)
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
  return info
