"""Export of a training run's backbone: diffusers directory or flat safetensors.

The library behind `python -m rflow_jax.export` (a test or a notebook calls
`export_workdir` the same way). Two formats:

  diffusers    OUT/transformer/ (config.json and
               diffusion_pytorch_model.safetensors, loaded by
               SD3Transformer2DModel.from_pretrained) and
               OUT/scheduler/scheduler_config.json (FlowMatchEulerDiscrete-
               Scheduler, num_train_timesteps 1000, the run's `sample.shift`).
               Only for rf (velocity-output) formulations: that scheduler
               integrates a velocity field with timestep = 1000·sigma.
  safetensors  OUT/params.safetensors: the param tree as is, names joined
               with '/' (e.g. "blocks_0/x/attn/qkv/kernel"), for any run.

Both write OUT/rflow_jax_export.json: the backbone's arch and constructor
arguments, the checkpoint step, which params (ema/raw), the formulation and
the sampling settings; `load_flat` rebuilds (model, params) from a
safetensors export with it. Runs of the RQ2 baselines (config.model.arch, see
rflow_jax.model.baselines) export as safetensors only.

OUT is written to a temporary sibling directory and renamed into place, so an
interrupted export leaves no partial OUT. The text encoders are not exported
(our tiny encoders have no diffusers equivalent), so OUT is not a complete
StableDiffusion3Pipeline; `python -m rflow_jax.sample --workdir=W
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

from rflow_jax import cli
from rflow_jax import config_lib
from rflow_jax import paths
from rflow_jax.export import diffusers as export_diffusers
from rflow_jax.model import baselines
from rflow_jax.model import mmdit

FORMATS = ("diffusers", "safetensors")
PARAM_CHOICES = ("ema", "raw")
TRANSFORMER_DIR = "transformer"
SCHEDULER_DIR = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
FLAT_WEIGHTS_NAME = "params.safetensors"
INFO_NAME = "rflow_jax_export.json"
# FlowMatchEulerDiscreteScheduler's num_train_timesteps in every SD3 release.
NUM_TRAIN_TIMESTEPS = 1000


def scheduler_config(shift: float) -> dict[str, Any]:
  """scheduler_config.json of FlowMatchEulerDiscreteScheduler (as SD3 ships it).

  Args:
    shift: the timestep shift alpha > 0 (config.sample.shift).

  Returns:
    The JSON dict; diffusers fills the other fields with their defaults
    (no dynamic shifting).
  """
  if not shift > 0:
    raise ValueError(f"sample.shift={shift} must be positive")
  return {"_class_name": "FlowMatchEulerDiscreteScheduler",
          "_diffusers_version": "0.42.1",
          "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": float(shift)}


def model_config(config) -> tuple[str, dict[str, Any]]:
  """(arch, JSON-able constructor arguments) of a run's backbone.

  The dtype is stored by name.
  """
  kwargs = config_lib.model_kwargs(config)
  arch = config.model.arch
  kwargs["dtype"] = config.model.dtype
  return arch, {k: list(v) if isinstance(v, tuple) else v
                for k, v in kwargs.items()}


def model_from_config(arch: str, kwargs: dict[str, Any]) -> nn.Module:
  """Inverse of `model_config`: the backbone (MMDiT or an RQ2 baseline)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in kwargs.items()}
  if kwargs.get("dtype") not in config_lib.DTYPES:
    raise ValueError(f"model dtype {kwargs.get('dtype')!r} is not one of "
                     f"{sorted(config_lib.DTYPES)}")
  kwargs["dtype"] = config_lib.DTYPES[kwargs["dtype"]]
  return baselines.build(arch, **kwargs)


def save_flat(params: Any, path: str | os.PathLike[str]) -> None:
  """Writes a param tree as one safetensors file with '/'-joined names.

  Args:
    params: nested dict of arrays (boxed or not, device or host).
    path: the .safetensors file to write.
  """
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  tensors = {k: np.ascontiguousarray(jax.device_get(v))
             for k, v in flat.items()}
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "flax"})


def load_flat(out_dir: str | os.PathLike[str]) -> tuple[nn.Module, Any,
                                                        dict[str, Any]]:
  """(backbone, nested numpy params, export info) of a safetensors export."""
  out_dir = pathlib.Path(out_dir)
  info = json.loads((out_dir / INFO_NAME).read_text())
  params = safetensors.numpy.load_file(str(out_dir / FLAT_WEIGHTS_NAME))
  return (model_from_config(info["arch"], info["model"]),
          flax.traverse_util.unflatten_dict(params, sep="/"), info)


def export_workdir(workdir: str | os.PathLike[str],
                   out: str | os.PathLike[str], *, fmt: str = "diffusers",
                   params: str = "ema", overwrite: bool = False
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
  from rflow_jax.flow import formulations  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r} is not one of {list(FORMATS)}")
  if params not in PARAM_CHOICES:
    raise ValueError(f"--params={params!r} is not one of "
                     f"{list(PARAM_CHOICES)}")
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  if not workdir.is_dir():
    raise FileNotFoundError(f"--workdir={str(workdir)!r} is not a directory")
  config = cli.load_config(str(workdir))
  out = pathlib.Path(paths.check_output_dir(out, marker=INFO_NAME, overwrite=overwrite))  # Before any restore.
  formulation = formulations.get(config.flow.formulation,
                                 shift=config.flow.shift)
  if fmt == "diffusers" and formulation.output != formulations.VELOCITY:
    raise ValueError(
        f"flow.formulation={config.flow.formulation!r} predicts "
        f"{formulation.output!r}, not the rf velocity that diffusers' "
        f"FlowMatchEulerDiscreteScheduler integrates; use --format=safetensors")
  arch, kwargs = model_config(config)
  if fmt == "diffusers" and arch != "mmdit":
    raise ValueError(f"model.arch={arch!r}: only the MM-DiT has a diffusers "
                     f"equivalent (SD3Transformer2DModel); use "
                     f"--format=safetensors")
  model = model_from_config(arch, kwargs)
  weights, _, step = checkpoint.restore_params(str(workdir),
                                               use_ema=params == "ema")
  info = {"format": fmt, "workdir": str(workdir.resolve()), "step": int(step),
          "params": params, "arch": arch, "model": kwargs,
          "flow": {"formulation": formulation.name, "shift": config.flow.shift},
          "sample": {"shift": config.sample.shift,
                     "num_steps": config.sample.num_steps,
                     "cfg_scale": config.sample.cfg_scale}}
  with paths.staged_dir(str(out)) as staged:  # Readable (umask), atomic, no partial OUT.
    tmp = pathlib.Path(staged)
    if fmt == "diffusers":
      export_diffusers.save_transformer(weights, model, tmp / TRANSFORMER_DIR,
                                        sample_size=config.data.image_size)
      (tmp / SCHEDULER_DIR).mkdir()
      (tmp / SCHEDULER_DIR / SCHEDULER_CONFIG_NAME).write_text(
          json.dumps(scheduler_config(config.sample.shift), indent=2) + "\n")
    else:
      save_flat(weights, tmp / FLAT_WEIGHTS_NAME)
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
  return info


def load_transformer_for(path: str | os.PathLike[str], config
                         ) -> tuple[mmdit.MMDiT, Any]:
  """A diffusers transformer directory as the MM-DiT of a run's config.

  The compute settings (dtype, attention_impl) come from the config; the
  architecture comes from the directory and must fit the run's text stack
  (context and pooled widths = text.width), channels and image size.

  Args:
    path: a diffusers SD3Transformer2DModel directory.
    config: the resolved config of the workdir that supplies the text stack.

  Returns:
    (model, params) with host numpy params.

  Raises:
    ValueError: naming the first mismatch between the directory and the run.
  """
  path = pathlib.Path(path)
  overrides = dict(dtype=config_lib.DTYPES[config.model.dtype],
                   attention_impl=config.model.attention_impl)
  config_file = path / export_diffusers.CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(f"--transformer={str(path)!r} has no "
                            f"{export_diffusers.CONFIG_NAME}: not a diffusers "
                            f"transformer directory")
  # The architecture is checked against the run before any weight is read.
  model = export_diffusers.model_from_diffusers_config(
      json.loads(config_file.read_text()), **overrides)
  grid = config.data.image_size // model.patch_size
  checks = [
      ("joint_attention_dim", model.context_dim, "text.width",
       config.text.width),
      ("pooled_projection_dim", model.pooled_dim, "text.width",
       config.text.width),
      ("in_channels", model.in_channels, "model.in_channels",
       config.model.in_channels),
      ("out_channels", model.output_channels, "model.in_channels",
       config.model.in_channels)]
  for theirs, value, ours, expected in checks:
    if value != expected:
      raise ValueError(f"--transformer={str(path)!r} has {theirs}={value}, "
                       f"but the workdir's {ours}={expected}")
  if (config.data.image_size % model.patch_size
      or grid > model.pos_embed_max_size):
    raise ValueError(
        f"--transformer={str(path)!r} (patch_size={model.patch_size}, "
        f"pos_embed_max_size={model.pos_embed_max_size}) cannot take the "
        f"workdir's data.image_size={config.data.image_size}")
  return export_diffusers.load_transformer(path, **overrides)
