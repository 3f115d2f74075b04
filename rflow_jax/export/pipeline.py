"""Whole StableDiffusion3Pipeline directories, both ways: write ours, and check and read any (released or ours).

  write_pipeline(directory, components, shift)     # model_index.json, transformer/, vae/, text_encoder{,_2,_3}/,
                                                   # tokenizer{,_2,_3}/, scheduler/  (StableDiffusion3Pipeline.
                                                   # from_pretrained(directory) loads it)
  index = check_pipeline(path)                     # every component's class, folder and cross-sizes; one line each
  components = load_pipeline(path, t5_length=256)  # ours: MM-DiT, VAE, text stack and tokenizers, with their params

Names and layouts are the per-component modules' (diffusers.py, vae.py, text.py / text_save.py); this module only
lays the components out as diffusers' pipeline loader expects them and checks that they fit together, before any
weight is read or anything is compiled. The sampler's conventions (σ grid "diffusers", Euler, the empty negative
prompt, the latent shift/scale before the VAE decode) are those of rflow_jax/sampling, shared with a run's sampling.
"""

import dataclasses
import json
import os
import pathlib
from typing import Any

from rflow_jax.export import diffusers as export_diffusers
from rflow_jax.export import diffusers_io
from rflow_jax.export import original
from rflow_jax.export import text
from rflow_jax.export import text_save
from rflow_jax.export import vae as export_vae
from rflow_jax.model.text import sd3
from rflow_jax.sampling import schedules

PIPELINE_CLASS = "StableDiffusion3Pipeline"
MODEL_INDEX = "model_index.json"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SCHEDULER_DIR, SCHEDULER_CONFIG_NAME = "scheduler", "scheduler_config.json"
TRANSFORMER_DIR = "transformer"
# model_index.json entry -> (library, the classes we read there). T5's pair may be [null, null] (T5 off).
COMPONENTS = {
    "transformer": ("diffusers", (export_diffusers.CLASS_NAME,)),
    "vae": ("diffusers", (export_vae.CLASS_NAME,)),
    "scheduler": ("diffusers", (SCHEDULER_CLASS,)),
    "text_encoder": ("transformers", ("CLIPTextModelWithProjection",)),
    "text_encoder_2": ("transformers", ("CLIPTextModelWithProjection",)),
    "text_encoder_3": ("transformers", text.T5_ARCHITECTURES),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_2": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_3": ("transformers", ("T5Tokenizer", "T5TokenizerFast")),
}
OPTIONAL = ("text_encoder_3", "tokenizer_3")
# StableDiffusion3Pipeline.__call__'s defaults (diffusers 0.42): what `sample --pipeline` does unless told otherwise.
DEFAULT_STEPS = 28  # num_inference_steps
DEFAULT_CFG = 7.0  # guidance_scale
DEFAULT_T5_LENGTH = 256  # max_sequence_length
DEFAULT_NEGATIVE_PROMPT = ""  # negative_prompt=None encodes the empty prompt
# Scheduler options that change the σ grid or the step; we sample the plain shifted grid with the ODE step only.
_SCHEDULER_OFF = (
    "use_dynamic_shifting",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
    "shift_terminal",
)


class PipelineError(ValueError):
  """A pipeline directory that is incomplete, of other classes, or whose components do not fit together."""


def scheduler_config(shift: float) -> dict[str, Any]:
  """scheduler_config.json of FlowMatchEulerDiscreteScheduler (as SD3 ships it).

  Args:
    shift: the timestep shift alpha > 0 (config.sample.shift).

  Returns:
    The JSON dict; diffusers fills the other fields with their defaults (no dynamic shifting).
  """
  if not shift > 0:
    raise ValueError(f"sample.shift={shift} must be positive")
  return {
      "_class_name": SCHEDULER_CLASS,
      "_diffusers_version": "0.42.1",
      "num_train_timesteps": schedules.DIFFUSERS_NUM_TRAIN_TIMESTEPS,
      "shift": float(shift),
  }


def write_scheduler(directory: str | os.PathLike[str], shift: float) -> None:
  """Writes DIRECTORY/scheduler/scheduler_config.json."""
  (pathlib.Path(directory) / SCHEDULER_DIR).mkdir()
  path = pathlib.Path(directory) / SCHEDULER_DIR / SCHEDULER_CONFIG_NAME
  path.write_text(json.dumps(scheduler_config(shift), indent=2) + "\n")


@dataclasses.dataclass
class Components:
  """Everything a StableDiffusion3Pipeline holds, as our modules and (host or device) params.

  Attributes:
    model, params: the MM-DiT.
    vae, vae_params: the AutoencoderKL (its scaling/shift factors are the pipeline's).
    tokenizer: an SD3Tokenizer (tokenizer.t5 None: T5 off).
    text_stack, text_params: the SD3TextStack (t5 None: T5 off) and its params {clip_l, clip_g[, t5]}.
    shift: the scheduler's timestep shift.
    sample_size: the transformer's sample_size (latent pixels of the default image size).
  """

  model: Any
  params: Any
  vae: Any
  vae_params: Any
  tokenizer: Any
  text_stack: Any
  text_params: Any
  shift: float
  sample_size: int

  @property
  def default_image_size(self) -> int:
    """diffusers' default height and width: sample_size · vae_scale_factor."""
    return self.sample_size * self.vae.downsample_factor


def write_pipeline(directory: str | os.PathLike[str], c: Components) -> None:
  """Writes the components into the (new, empty) `directory` in StableDiffusion3Pipeline's layout.

  The caller makes the directory atomic (paths.staged_dir); the components' own writers stage each subfolder.
  """
  d = pathlib.Path(directory)
  diffusers_io.save_transformer(c.params, c.model, d / TRANSFORMER_DIR, sample_size=c.sample_size)
  export_vae.save_vae(c.vae_params, c.vae, d / export_vae.PIPELINE_SUBFOLDER)
  stack, tok = c.text_stack, c.tokenizer
  (l_dir, l_tok), (g_dir, g_tok), (t_dir, t_tok) = text.SD3_FOLDERS
  text_save.save_clip(c.text_params["clip_l"], stack.clip_l, d / l_dir, tokenizer=tok.clip_l)
  text_save.save_clip(c.text_params["clip_g"], stack.clip_g, d / g_dir, tokenizer=tok.clip_g)
  tok.clip_l.save_pretrained(str(d / l_tok))
  tok.clip_g.save_pretrained(str(d / g_tok))
  index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": "0.42.1"}
  index.update(feature_extractor=[None, None], image_encoder=[None, None])
  if stack.t5 is not None:
    text_save.save_t5(c.text_params["t5"], stack.t5, d / t_dir)
    tok.t5.save_pretrained(str(d / t_tok))
  write_scheduler(d, c.shift)
  for name, (library, classes) in COMPONENTS.items():
    index[name] = [library, classes[0]]
  for name, tokenizer in (("tokenizer", tok.clip_l), ("tokenizer_2", tok.clip_g), ("tokenizer_3", tok.t5)):
    if tokenizer is not None:  # The class diffusers' loader instantiates: the one that wrote the files.
      index[name] = ["transformers", type(tokenizer).__name__]
  if stack.t5 is None:  # diffusers' T5-off pipeline: no text_encoder_3, zeros in its tokens.
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
  (d / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _json(path: pathlib.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PipelineError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def check_pipeline(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Checks a StableDiffusion3Pipeline directory's layout before any weight is read; returns its model_index.

  Every component named by model_index.json must be of a class we read and have its folder, each folder's config must
  describe that class, and the sizes that connect them must agree (VAE latents = transformer channels; T5 width =
  context width; CLIP projections = pooled width). Tokenizers are checked against their encoders when loaded.

  Raises:
    PipelineError / FileNotFoundError: one line naming the file or field.
  """
  path = pathlib.Path(path)
  diffusers_io.refuse_pickle(path)
  if not path.is_dir():
    raise FileNotFoundError(f"--pipeline={str(path)!r} is not a directory")
  index_file = path / MODEL_INDEX
  if not index_file.is_file():
    raise FileNotFoundError(f"{index_file} does not exist: not a diffusers pipeline directory")
  index = _json(index_file)
  if index.get("_class_name") != PIPELINE_CLASS:
    raise PipelineError(f"{index_file} describes {index.get('_class_name')!r}, not {PIPELINE_CLASS}")
  for name, (library, classes) in COMPONENTS.items():
    entry = index.get(name)
    if not _given(index, name) and name in OPTIONAL:
      continue
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
      raise PipelineError(f"{index_file} has no {name} (expected {library} {classes[0]})")
    if entry[1] not in classes:
      raise PipelineError(f"{index_file}: {name} is a {entry[1]}, not a {' or '.join(classes)}")
    if not (path / name).is_dir():
      raise FileNotFoundError(f"{path / name} is missing ({index_file} names a {entry[1]})")
  has_t5 = _given(index, "text_encoder_3")
  if has_t5 != _given(index, "tokenizer_3"):
    raise PipelineError(f"{index_file}: text_encoder_3 and tokenizer_3 must both be given or both be null")
  for name in ("transformer", "vae"):
    cfg_file = path / name / diffusers_io.CONFIG_NAME
    if not cfg_file.is_file():
      raise FileNotFoundError(f"{cfg_file} does not exist")
    found = _json(cfg_file).get("_class_name")
    if found != COMPONENTS[name][1][0]:
      raise PipelineError(f"{cfg_file} describes {found}, not {COMPONENTS[name][1][0]}")
  scheduler_shift(path)
  transformer, vae = _json(path / "transformer" / diffusers_io.CONFIG_NAME), export_vae.read_config(path / "vae")
  joint_width = transformer.get("joint_attention_dim", 4096)  # diffusers' default for the field.
  l_cfg, _ = text.clip_config(path / "text_encoder")
  g_cfg, _ = text.clip_config(path / "text_encoder_2")
  checks = [
      ("in_channels", transformer.get("in_channels", 16), "vae/config.json latent_channels", vae["latent_channels"]),
      (
          "pooled_projection_dim",
          transformer.get("pooled_projection_dim", 2048),
          "the projection_dim of text_encoder + text_encoder_2",
          l_cfg.projection_dim + g_cfg.projection_dim,
      ),
  ]
  if has_t5:
    checks.append(
        (
            "joint_attention_dim",
            joint_width,
            "text_encoder_3/config.json d_model",
            text.t5_config(path / "text_encoder_3")[0].width,
        )
    )
  for field, value, what, want in checks:
    if value != want:
      raise PipelineError(f"{path / 'transformer' / diffusers_io.CONFIG_NAME}: {field}={value}, but {what} is {want}")
  clip_width = l_cfg.width + g_cfg.width
  if clip_width > joint_width:
    raise PipelineError(
        f"{path / 'transformer' / diffusers_io.CONFIG_NAME}: joint_attention_dim="
        f"{joint_width} is narrower than the two CLIP towers ({clip_width})"
    )
  return index


def _given(index: dict, name: str) -> bool:
  """Whether model_index.json names component `name` (diffusers writes an absent one as [null, null] or omits it)."""
  return index.get(name) not in (None, [None, None])


def scheduler_shift(path: str | os.PathLike[str]) -> float:
  """The timestep shift of PATH/scheduler/scheduler_config.json, refusing options whose grid we do not sample."""
  cfg_file = pathlib.Path(path) / SCHEDULER_DIR / SCHEDULER_CONFIG_NAME
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} does not exist")
  cfg = _json(cfg_file)
  if cfg.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
    raise PipelineError(f"{cfg_file} describes {cfg['_class_name']}, not {SCHEDULER_CLASS}")
  on = [k for k in _SCHEDULER_OFF if cfg.get(k)]
  if on:
    raise PipelineError(f"{cfg_file}: {on[0]}={cfg[on[0]]!r} is not supported (only the plain shifted sigma grid)")
  n = cfg.get("num_train_timesteps", schedules.DIFFUSERS_NUM_TRAIN_TIMESTEPS)
  if n != schedules.DIFFUSERS_NUM_TRAIN_TIMESTEPS:
    raise PipelineError(f"{cfg_file}: num_train_timesteps={n}; only {schedules.DIFFUSERS_NUM_TRAIN_TIMESTEPS}")
  shift = cfg.get("shift", 1.0)
  if not (isinstance(shift, (int, float)) and shift > 0):
    raise PipelineError(f"{cfg_file}: shift={shift!r} must be a positive number")
  return float(shift)


def _check_tokenizer(path: pathlib.Path, folder: str, tokenizer, cfg) -> None:
  """A CLIP tokenizer must end prompts with the token its encoder pools at (a vocabulary-size check cannot see a
  tokenizer of the same size from another model)."""
  if cfg.eos_token_id != 2 and tokenizer.eos_token_id != cfg.eos_token_id:  # 2: the legacy argmax pooling.
    raise PipelineError(
        f"{path / folder}: eos token id {tokenizer.eos_token_id}, but its encoder's config.json has eos_token_id "
        f"{cfg.eos_token_id} (a tokenizer of another model?)"
    )


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    t5_length: int = DEFAULT_T5_LENGTH,
    use_t5: bool | None = None,
    dtype=None,
    single_file: str | os.PathLike[str] | None = None,
) -> Components:
  """A StableDiffusion3Pipeline directory as our modules and host params, checked before anything is compiled.

  Args:
    path: the pipeline directory.
    t5_length: T5 tokens per prompt (diffusers' max_sequence_length).
    use_t5: None: T5 on when the pipeline has text_encoder_3; False: off (zeros, as diffusers without it).
    dtype: compute dtype of every module (None: float32).
    single_file: a released all-in-one .safetensors (Stability's layout) whose MM-DiT and VAE replace the
      directory's (the directory still gives the text encoders, tokenizers and scheduler).

  Returns:
    The Components.
  """
  path = pathlib.Path(path)
  index = check_pipeline(path)
  has_t5 = _given(index, "text_encoder_3")
  if use_t5 and not has_t5:
    raise PipelineError(f"{path / MODEL_INDEX} has no text_encoder_3: T5 cannot be on")
  use_t5 = has_t5 if use_t5 is None else use_t5
  overrides = {} if dtype is None else {"dtype": dtype}
  tokenizer, stack = text.sd3_stack(path, t5_length, use_t5=use_t5, **overrides)
  _check_tokenizer(path, "tokenizer", tokenizer.clip_l, stack.clip_l.cfg)
  _check_tokenizer(path, "tokenizer_2", tokenizer.clip_g, stack.clip_g.cfg)
  shift = scheduler_shift(path)
  sample_size = _json(path / TRANSFORMER_DIR / diffusers_io.CONFIG_NAME).get("sample_size", 128)
  if single_file is None:
    model, params = diffusers_io.load_transformer(path / TRANSFORMER_DIR, **overrides)
    vae, vae_params = export_vae.load_vae(path / export_vae.PIPELINE_SUBFOLDER, **overrides)
  else:
    model, params, vae, vae_params = original.load_single_file(single_file, **overrides)
    _, context_width, pooled_width = sd3.dims(stack)
    for field, value, want in (
        ("context width", model.context_dim, context_width),
        ("pooled width", model.pooled_dim, pooled_width),
        ("in_channels", model.in_channels, vae.latent_channels),
    ):
      if value != want:
        raise PipelineError(
            f"{single_file}: the MM-DiT's {field} is {value}, but {path}'s encoders and VAE give {want}"
        )
  return Components(
      model=model,
      params=params,
      vae=vae,
      vae_params=vae_params,
      tokenizer=tokenizer,
      text_stack=stack,
      text_params=text.sd3_params(path, stack),
      shift=shift,
      sample_size=sample_size,
  )
