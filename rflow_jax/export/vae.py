"""Exact conversion between our `AutoencoderKL` and diffusers' AutoencoderKL directories, both ways.

  model, params = load_vae(path)         # an AutoencoderKL dir, or a pipeline dir with a vae/ subfolder
  save_vae(params, model, out_dir)       # AutoencoderKL.from_pretrained(out_dir) loads it

Layout differences (every one of them is here):

  torch Conv2d weight (O, I, kh, kw)     <-> Conv kernel (kh, kw, I, O)
  torch Linear weight (O, I)             <-> Dense kernel (I, O)   (the mid-block attention's to_q/k/v/out)
  GroupNorm weight                       <-> GroupNorm scale
  module names (encoder.down_blocks.1.resnets.0.conv1 <-> encoder/down_1_res_0/conv1, ...): `torch_name`.

The latent normalisation (scaling_factor, shift_factor) travels in config.json as diffusers stores it. Files are read
and written with safetensors only: pickle checkpoints are refused (export.diffusers_io.refuse_pickle).
"""

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.export import diffusers as dx
from rflow_jax.export import diffusers_io
from rflow_jax.model import vae as vae_lib

CLASS_NAME = "AutoencoderKL"
PIPELINE_SUBFOLDER = "vae"
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
_CONV = dx.Layout(lambda k, xp: (k.transpose(3, 2, 0, 1),), lambda ts, xp: ts[0].transpose(2, 3, 1, 0))

# AutoencoderKL.__init__ defaults (diffusers 0.42), for keys a config.json leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=(DOWN_BLOCK,),
    up_block_types=(UP_BLOCK,),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)

# Our module path piece -> diffusers', applied in order to the '/'-joined path of a parameter.
_RENAMES = (
    (r"(down|up)_(\d+)_res_(\d+)", r"\1_blocks.\2.resnets.\3"),
    (r"down_(\d+)_downsample", r"down_blocks.\1.downsamplers.0.conv"),
    (r"up_(\d+)_upsample", r"up_blocks.\1.upsamplers.0.conv"),
    (r"^(encoder|decoder)/mid/res_(\d)", r"\1/mid_block.resnets.\2"),
    (r"^(encoder|decoder)/mid/attn/norm", r"\1/mid_block.attentions.0.group_norm"),
    (r"^(encoder|decoder)/mid/attn/(q|k|v)/", r"\1/mid_block.attentions.0.to_\2/"),
    (r"^(encoder|decoder)/mid/attn/proj", r"\1/mid_block.attentions.0.to_out.0"),
    (r"/norm_out/", r"/conv_norm_out/"),
    (r"/(kernel|scale)$", r"/weight"),
)


def torch_name(path: str) -> str:
  """Our '/'-joined param path -> the diffusers state-dict key (e.g. encoder/mid/attn/q/kernel ->
  encoder.mid_block.attentions.0.to_q.weight)."""
  for pattern, repl in _RENAMES:
    path = re.sub(pattern, repl, path)
  return path.replace("/", ".")


def abstract_params(model: vae_lib.AutoencoderKL) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the model's params (no allocation)."""
  f = model.downsample_factor
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
  )["params"]
  return flax.traverse_util.flatten_dict(nn.unbox(shapes), sep="/")


def _layout(path: str, ndim: int) -> dx.Layout:
  if path.endswith("/kernel"):
    return _CONV if ndim == 4 else dx.LAYOUTS["linear"]
  return dx.LAYOUTS["copy"]


def _expected(model) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, tuple[int, ...]]]:
  ours = abstract_params(model)
  # Layouts only transpose: apply them to zero-stride views (no allocation, no tracing) to get the torch shapes.
  view = lambda v: np.broadcast_to(np.zeros((), v.dtype), v.shape)
  theirs = {torch_name(k): _layout(k, len(v.shape)).to_torch(view(v), np)[0].shape for k, v in ours.items()}
  return ours, theirs


def _one_line(state_dict, expected, where: str) -> None:
  """export.diffusers' full check, reported as one line: the first problem, naming `where` and the tensor."""
  try:
    dx._validate(state_dict, expected, where)  # pylint: disable=protected-access
  except ValueError as e:
    problems = str(e).splitlines()[1:]
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise ValueError(f"{where}: {problems[0].strip()}{more}") from None


def params_from_diffusers(
    state_dict: Mapping[str, Any], model: vae_lib.AutoencoderKL, where: str = "diffusers state dict"
) -> dict[str, Any]:
  """Our nested params (host numpy, param_dtype) from a diffusers AutoencoderKL state dict.

  Args:
    state_dict: diffusers key -> array.
    model: the AutoencoderKL whose config matches (model_from_diffusers_config).
    where: what the state dict came from, for the error message.

  Raises:
    ValueError: one line naming `where` and the first missing, unexpected or misshapen tensor.
  """
  ours, expected = _expected(model)
  _one_line(state_dict, expected, where)
  flat = {
      k: np.ascontiguousarray(
          _layout(k, len(v.shape)).from_torch((np.asarray(state_dict[torch_name(k)]),), np), dtype=v.dtype
      )
      for k, v in ours.items()
  }
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def params_to_diffusers(params: Mapping[str, Any], model: vae_lib.AutoencoderKL) -> dict[str, np.ndarray]:
  """A diffusers AutoencoderKL state dict (C-contiguous numpy) from our params (boxed or not)."""
  ours = abstract_params(model)
  flat = flax.traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")
  _one_line(flat, {k: tuple(v.shape) for k, v in ours.items()}, "params")
  return {
      torch_name(k): np.ascontiguousarray(_layout(k, np.ndim(v)).to_torch(np.asarray(v), np)[0])
      for k, v in flat.items()
  }


def model_from_diffusers_config(cfg: Mapping[str, Any], **overrides: Any) -> vae_lib.AutoencoderKL:
  """The AutoencoderKL equivalent to a diffusers AutoencoderKL config.json.

  Args:
    cfg: the parsed config (keys starting with "_" are ignored).
    **overrides: non-architectural attributes (dtype, remat, ...).

  Raises:
    ValueError: naming the first key or value we cannot represent.
  """
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"unsupported AutoencoderKL config keys {unknown}")
  c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
  n = len(c["block_out_channels"])
  for key, want in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
    if list(c[key]) != [want] * n:
      raise ValueError(
          f"AutoencoderKL {key}={list(c[key])}: only {n} x {want!r} (one per block_out_channels " "entry) is supported"
      )
  if c["act_fn"] != "silu":
    raise ValueError(f"AutoencoderKL act_fn={c['act_fn']!r}: only 'silu' is supported")
  if c["latents_mean"] is not None or c["latents_std"] is not None:
    raise ValueError(
        "AutoencoderKL latents_mean/latents_std (per-channel statistics) are not supported; "
        "use scaling_factor and shift_factor"
    )
  kwargs = dict(
      block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
      layers_per_block=c["layers_per_block"],
      norm_num_groups=c["norm_num_groups"],
      latent_channels=c["latent_channels"],
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      use_quant_conv=c["use_quant_conv"],
      use_post_quant_conv=c["use_post_quant_conv"],
      mid_block_attention=c["mid_block_add_attention"],
      scaling_factor=float(c["scaling_factor"]),
      shift_factor=float(c["shift_factor"] or 0.0),
  )
  arch = sorted(set(overrides) & set(kwargs) - {"scaling_factor", "shift_factor"})
  if arch:
    raise ValueError(f"overrides {arch} would change the architecture")
  model = vae_lib.AutoencoderKL(**{**kwargs, **overrides})
  model.check_config()
  return model


def diffusers_config(model: vae_lib.AutoencoderKL) -> dict[str, Any]:
  """The diffusers AutoencoderKL config.json of a model (scaling and shift factors included)."""
  model.check_config()
  n = len(model.block_out_channels)
  return {
      "_class_name": CLASS_NAME,
      "_diffusers_version": "0.42.1",
      "in_channels": model.in_channels,
      "out_channels": model.out_channels,
      "down_block_types": [DOWN_BLOCK] * n,
      "up_block_types": [UP_BLOCK] * n,
      "block_out_channels": list(model.block_out_channels),
      "layers_per_block": model.layers_per_block,
      "act_fn": "silu",
      "latent_channels": model.latent_channels,
      "norm_num_groups": model.norm_num_groups,
      "sample_size": 32 * model.downsample_factor,  # Tiling tile size only; unused by our code.
      "scaling_factor": float(model.scaling_factor),
      "shift_factor": float(model.shift_factor),
      "latents_mean": None,
      "latents_std": None,
      "force_upcast": True,
      "use_quant_conv": model.use_quant_conv,
      "use_post_quant_conv": model.use_post_quant_conv,
      "mid_block_add_attention": model.mid_block_attention,
  }


def resolve_dir(path: str | os.PathLike[str]) -> pathlib.Path:
  """An AutoencoderKL directory: `path` itself, or its `vae/` subfolder when `path` is a pipeline directory."""
  path = pathlib.Path(path)
  diffusers_io.refuse_pickle(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory (expected a diffusers AutoencoderKL or pipeline directory)")
  if not (path / diffusers_io.CONFIG_NAME).exists() and (path / PIPELINE_SUBFOLDER / diffusers_io.CONFIG_NAME).exists():
    return path / PIPELINE_SUBFOLDER
  if not (path / diffusers_io.CONFIG_NAME).exists():
    raise FileNotFoundError(
        f"{path} has no {diffusers_io.CONFIG_NAME} (nor {PIPELINE_SUBFOLDER}/{diffusers_io.CONFIG_NAME}): not a "
        "diffusers AutoencoderKL directory"
    )
  return path


def read_config(path: pathlib.Path) -> dict[str, Any]:
  """config.json of an AutoencoderKL directory, checked to describe an AutoencoderKL."""
  cfg = json.loads((path / diffusers_io.CONFIG_NAME).read_text())
  if cfg.get("_class_name", CLASS_NAME) != CLASS_NAME:
    raise ValueError(f"{path / diffusers_io.CONFIG_NAME} describes {cfg['_class_name']}, not {CLASS_NAME}")
  return cfg


def load_vae(path: str | os.PathLike[str], **overrides: Any) -> tuple[vae_lib.AutoencoderKL, dict[str, Any]]:
  """Loads a diffusers AutoencoderKL directory as (model, params), checked before anything is compiled.

  Args:
    path: directory with config.json + diffusion_pytorch_model.safetensors (or its sharded index), or a pipeline
      directory whose vae/ subfolder is one.
    **overrides: non-architectural model attributes (dtype, remat, ...).

  Returns:
    The model (scaling/shift factors from the config) and its params (host numpy arrays).

  Raises:
    FileNotFoundError / ValueError: one line naming the file and the bad key, value or tensor.
  """
  path = resolve_dir(path)
  model = model_from_diffusers_config(read_config(path), **overrides)
  files = diffusers_io.weight_files(path)  # pylint: disable=protected-access
  state_dict = diffusers_io.load_safetensors(files)
  where = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} safetensors shards)"
  return model, params_from_diffusers(state_dict, model, where)


def save_vae(
    params: Mapping[str, Any], model: vae_lib.AutoencoderKL, out_dir: str | os.PathLike[str], overwrite: bool = False
) -> pathlib.Path:
  """Writes `out_dir` (config.json + diffusion_pytorch_model.safetensors) for AutoencoderKL.from_pretrained.

  Written to a temporary sibling and renamed into place (export.diffusers_io.write_model_dir).

  Args:
    params: our param tree (boxed or unboxed; device or host arrays).
    model: the AutoencoderKL they belong to; its scaling_factor / shift_factor go into config.json.
    out_dir: target directory.
    overwrite: replace an existing out_dir.

  Returns:
    The output directory.
  """
  return diffusers_io.write_model_dir(
      diffusers_config(model), params_to_diffusers(params, model), out_dir, overwrite=overwrite
  )


def set_latent_factors(out_dir: str | os.PathLike[str], scaling_factor: float, shift_factor: float) -> None:
  """Rewrites the scaling/shift factors in an AutoencoderKL directory's config.json (atomically, by rename)."""
  path = resolve_dir(out_dir)
  cfg = read_config(path)
  cfg.update(scaling_factor=float(scaling_factor), shift_factor=float(shift_factor))
  tmp = path / f".{diffusers_io.CONFIG_NAME}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(cfg, indent=2) + "\n")
  os.replace(tmp, path / diffusers_io.CONFIG_NAME)
