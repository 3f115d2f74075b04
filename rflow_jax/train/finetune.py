"""Fine-tuning from a released (or exported) StableDiffusion3Pipeline: train.init_from="pipeline:D".

A fine-tune is a latent-space run (data.name="precomputed") whose transformer weights, VAE and text encoders are
the pipeline's: `resolve` points text.sd3_path and vae.path at D (when left empty) and checks, before anything is
built or written, that the config's model is the pipeline's transformer, naming the first field that differs and
both values in one line. `initial_params` reads the transformer's weights (the run's params and its EMA); the step,
optimizer state and data order start fresh. A workdir that already has a checkpoint resumes it: init_from is then
not read (trainer._restore_or_init), as for a warm start from a workdir.
"""

import json
import os
import pathlib
from typing import Any

from rflow_jax import config_lib
from rflow_jax.export import diffusers as diffusers_names, diffusers_io, pipeline as pipeline_lib
from rflow_jax.model import registry as model_registry

PREFIX = "pipeline:"  # train.init_from="pipeline:D" names a pipeline directory; anything else is a workdir.

# (our model attribute, the config field that sets it, the diffusers config key that sets the pipeline's), in the
# order they are checked. The context and pooled widths are the text stack's (text.sd3_path = D).
_FIELDS = (
    ("patch_size", "model.patch_size", "patch_size"),
    ("in_channels", "model.in_channels", "in_channels"),
    ("output_channels", "model.in_channels", "out_channels"),
    ("depth", "model.depth", "num_layers"),
    ("hidden_size", "model.hidden_size", "num_attention_heads * attention_head_dim"),
    ("num_heads", "model.num_heads", "num_attention_heads"),
    ("mlp_ratio", "model.mlp_ratio", "(fixed at 4 in diffusers)"),
    ("pos_embed_max_size", "model.pos_embed_max_size", "pos_embed_max_size"),
    ("qk_norm", "model.qk_norm", "qk_norm"),
    ("dual_attention_layers", "model.dual_attention_layers", "dual_attention_layers"),
    ("context_dim", "the text stack's context width (text.*)", "joint_attention_dim"),
    ("pooled_dim", "the text stack's pooled width (text.*)", "pooled_projection_dim"),
)


class FinetuneError(config_lib.ConfigError):
  """A fine-tune config that does not fit its pipeline; the message names the file or field and both values."""


def pipeline_dir(init_from: str) -> str | None:
  """D of train.init_from="pipeline:D", else None (a workdir, or "")."""
  return init_from[len(PREFIX) :] if init_from.startswith(PREFIX) else None


def _same_dir(a: str, b: str) -> bool:
  return os.path.realpath(a) == os.path.realpath(b)


def resolve(config, *, check_model: bool = True):
  """The config a fine-tune trains with: text.sd3_path and vae.path set to the pipeline when empty.

  Checks (each a FinetuneError or FileNotFoundError of one line, before any weight is read): the pipeline's layout
  (export.pipeline.check_pipeline), that the run is a latent-space run on SD3's text encoders whose paths are the
  pipeline's, and with `check_model` (a fresh start; a resume is checked against its own config.json instead) the
  model fields against D/transformer/config.json. A config without "pipeline:" is returned unchanged.
  """
  directory = pipeline_dir(config.train.init_from)
  if directory is None:
    return config
  where = f"train.init_from={config.train.init_from!r}"
  if not directory:
    raise FinetuneError(f"{where} names no directory: use pipeline:PATH")
  pipeline_lib.check_pipeline(directory)
  if config.task != "flow" or config.model.arch != "mmdit":
    raise FinetuneError(
        f"{where}: a pipeline's transformer is an MM-DiT trained with task='flow', "
        f"not task={config.task!r}, model.arch={config.model.arch!r}"
    )
  if config.train.init_grow_depth:
    raise FinetuneError(f"{where}: train.init_grow_depth grows a workdir's checkpoint; a pipeline keeps its depth")
  if config.text.encoders != "sd3":
    raise FinetuneError(f"{where}: the pipeline's text encoders are SD3's; set --config.text.encoders=sd3")
  if config.data.name != "precomputed":
    raise FinetuneError(
        f"{where}: the pipeline's transformer works on its VAE's latents, so a fine-tune trains on precomputed "
        f"records (data.name='precomputed', docs/data.md), not data.name={config.data.name!r}"
    )
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field, section in (("text.sd3_path", config.text), ("vae.path", config.vae)):
      key = field.split(".")[1]
      if not section[key]:
        section[key] = os.path.abspath(directory)
      elif not _same_dir(section[key], directory):
        raise FinetuneError(
            f"{field}={section[key]!r}, but {where} takes the text encoders and VAE from the pipeline: "
            f"leave {field} empty or set it to the pipeline"
        )
  if check_model:
    check_model_fields(config, directory)
  return config


def check_model_fields(config, directory: str) -> None:
  """FinetuneError naming the first model field of `config` that differs from D/transformer/config.json."""
  cfg_file = pathlib.Path(directory) / pipeline_lib.TRANSFORMER_DIR / diffusers_io.CONFIG_NAME
  try:
    theirs = diffusers_names.model_from_diffusers_config(json.loads(cfg_file.read_text()))
  except ValueError as e:
    raise FinetuneError(f"{cfg_file}: {e}") from None
  ours = model_registry.model_kwargs(config)
  ours["output_channels"] = ours.get("out_channels") or ours["in_channels"]
  for attr, field, key in _FIELDS:
    mine, want = ours[attr], getattr(theirs, attr)
    if isinstance(want, tuple):
      mine = tuple(int(i) for i in mine)
    if mine != want:
      shown = f"{field}={mine!r}" if field.startswith("model.") else f"{field} is {mine!r}"
      raise FinetuneError(
          f"{shown}, but the pipeline's {cfg_file} has {key}={want!r}: a fine-tune keeps the pipeline's "
          f"architecture (set the config's field to the pipeline's value)"
      )


def initial_params(config, model) -> dict[str, Any]:
  """The pipeline transformer's weights as host arrays in `model`'s layout (scanned groups stacked if it scans)."""
  path = diffusers_io.component_dir(pipeline_dir(config.train.init_from), pipeline_lib.TRANSFORMER_DIR)
  state_dict = diffusers_io.load_safetensors(diffusers_io.weight_files(path))
  return diffusers_names.params_from_diffusers(state_dict, model)
