"""Conversion between `MMDiT` params and the original SD3 / SD3.5 layout, and released all-in-one files.

The original single-file checkpoints (e.g. sd3.5_large.safetensors, keys under
`model.diffusion_model.`) use Stability's mmditx.py names. Our param tree
follows that layout closely, so this module is only a key table: the array
layouts (Linear transposes, fused qkv, conv) are the shared
`rflow_jax.export.diffusers.LAYOUTS`. Unlike diffusers, the original keeps
(shift, scale) order everywhere, as we do, so nothing is swapped.

A released all-in-one file (`load_single_file`) also holds the VAE under
`first_stage_model.` in the LDM names, which `vae_from_original` maps to
diffusers' AutoencoderKL names; both architectures are read from the tensors.
"""

from collections.abc import Mapping
import os
import pathlib
import re
from typing import Any

import numpy as np

from rflow_jax.export import diffusers as diffusers_export
from rflow_jax.export import diffusers_io
from rflow_jax.export import vae as export_vae
from rflow_jax.model import mmdit

Entry = diffusers_export.Entry

# Prefix of the transformer's tensors in the released single-file checkpoints.
PREFIX = "model.diffusion_model."


def _linear(ours: str, theirs: str) -> list[Entry]:
  return [Entry(f"{ours}/kernel", (f"{theirs}.weight",), "linear"), Entry(f"{ours}/bias", (f"{theirs}.bias",), "copy")]


def _attention(ours: str, theirs: str, qk_norm: bool, has_out: bool) -> list[Entry]:
  e = [
      Entry(f"{ours}/qkv/kernel", (f"{theirs}.qkv.weight",), "qkv_fused"),
      Entry(f"{ours}/qkv/bias", (f"{theirs}.qkv.bias",), "qkv_bias_fused"),
  ]
  if qk_norm:
    e += [
        Entry(f"{ours}/q_norm/scale", (f"{theirs}.ln_q.weight",), "copy"),
        Entry(f"{ours}/k_norm/scale", (f"{theirs}.ln_k.weight",), "copy"),
    ]
  if has_out:
    e += _linear(f"{ours}/proj", f"{theirs}.proj")
  return e


def original_entries(model: mmdit.MMDiT, prefix: str = PREFIX) -> list[Entry]:
  """The complete our-param <-> original-key table for a model config."""
  qk = model.qk_norm is not None
  e = [
      Entry("pos_embed", ("pos_embed",), "pos_table"),
      Entry("patch_embed/kernel", ("x_embedder.proj.weight",), "patch"),
      Entry("patch_embed/bias", ("x_embedder.proj.bias",), "copy"),
  ]
  e += _linear("t_embedder/fc1", "t_embedder.mlp.0")
  e += _linear("t_embedder/fc2", "t_embedder.mlp.2")
  e += _linear("y_embedder/fc1", "y_embedder.mlp.0")
  e += _linear("y_embedder/fc2", "y_embedder.mlp.2")
  e += _linear("context_embedder", "context_embedder")
  for i in range(model.depth):
    last = i == model.depth - 1
    for stream, block in (("x", "x_block"), ("context", "context_block")):
      ours, theirs = f"blocks_{i}/{stream}", f"joint_blocks.{i}.{block}"
      pre_only = last and stream == "context"
      e += _linear(f"{ours}/modulation", f"{theirs}.adaLN_modulation.1")
      e += _attention(f"{ours}/attn", f"{theirs}.attn", qk, not pre_only)
      if stream == "x" and i in model.dual_attention_layers:
        e += _attention(f"{ours}/attn2", f"{theirs}.attn2", qk, True)
      if not pre_only:
        e += _linear(f"{ours}/mlp/fc1", f"{theirs}.mlp.fc1")
        e += _linear(f"{ours}/mlp/fc2", f"{theirs}.mlp.fc2")
  e += _linear("final_layer/modulation", "final_layer.adaLN_modulation.1")
  e += _linear("final_layer/proj", "final_layer.linear")
  return [Entry(x.ours, tuple(prefix + k for k in x.theirs), x.layout) for x in e]


def params_from_original(state_dict: Mapping[str, Any], model: mmdit.MMDiT, prefix: str = PREFIX) -> dict[str, Any]:
  """Our params from an original-layout SD3/SD3.5 state dict.

  Tensors outside `prefix` (VAE, text encoders of the all-in-one files) are
  ignored; inside it every tensor must match the model config.

  Args:
    state_dict: key -> array, e.g. safetensors.numpy.load_file(...).
    model: the MMDiT matching the checkpoint (e.g. variants.variant(
      "sd3.5-large")).
    prefix: key prefix of the transformer ("" for a bare transformer dict).

  Returns:
    Nested dict of host numpy arrays in `model.param_dtype`.

  Raises:
    ValueError: listing every missing, unexpected or wrongly shaped tensor.
  """
  own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  return diffusers_export.params_from_state_dict(own, original_entries(model, prefix), model, "original SD3 state dict")


def params_to_original(params: Mapping[str, Any], model: mmdit.MMDiT, prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """An original-layout state dict (under `prefix`) from our params."""
  return diffusers_export.state_dict_from_params(params, original_entries(model, prefix), model)


def load_original(path: str | os.PathLike[str], model: mmdit.MMDiT, prefix: str = PREFIX) -> dict[str, Any]:
  """Reads an original single-file .safetensors checkpoint into our params.

  Args:
    path: the .safetensors file (pickle formats are refused).
    model: the MMDiT matching the checkpoint.
    prefix: key prefix of the transformer.

  Returns:
    Our params (host numpy arrays).
  """
  state_dict = diffusers_io.load_safetensors([pathlib.Path(path)])
  return params_from_original(state_dict, model, prefix)


# ----------------------------------------------------------------------------
# Released all-in-one files: the transformer's config from its tensors, and
# the VAE (LDM names under "first_stage_model.").
# ----------------------------------------------------------------------------

VAE_PREFIX = "first_stage_model."
# SD3's latent normalisation; the single files do not carry it (diffusers' SD3 vae/config.json does).
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609
LDM_GROUPS = 32  # LDM's Normalize: GroupNorm(32) everywhere.
_LDM_RENAMES = (  # LDM piece -> diffusers piece (`up` blocks are renumbered separately: LDM counts from the bottom).
    (r"\.down\.(\d+)\.block\.(\d+)\.", r".down_blocks.\1.resnets.\2."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
)


def _up_levels(keys) -> int:
  return len({int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k))})


def vae_name_from_original(key: str, levels: int) -> str:
  """An LDM VAE tensor name (prefix removed) -> diffusers' AutoencoderKL name."""
  key = re.sub(
      r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.", key
  )
  key = re.sub(
      r"^decoder\.up\.(\d+)\.upsample\.",
      lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.",
      key,
  )
  for pattern, repl in _LDM_RENAMES:
    key = re.sub(pattern, repl, key)
  return key


def vae_from_original(
    state_dict: Mapping[str, Any], prefix: str = VAE_PREFIX, norm_num_groups: int = LDM_GROUPS
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(diffusers AutoencoderKL config, diffusers state dict) of the LDM VAE under `prefix` in an all-in-one file.

  The architecture is read from the tensors' shapes (GroupNorm's group count is not in them: LDM's 32 unless told);
  the mid-block attention's 1x1 convs become Linear weights.
  """
  own = {k[len(prefix) :]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
  if "encoder.conv_in.weight" not in own:
    raise ValueError(f"no VAE in the file: no tensor {prefix}encoder.conv_in.weight")
  levels = _up_levels(own)
  widths = [own[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
  per_level = len({m.group(1) for k in own if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
  config = {
      "_class_name": "AutoencoderKL",
      "in_channels": int(own["encoder.conv_in.weight"].shape[1]),
      "out_channels": int(own["decoder.conv_out.weight"].shape[0]),
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "block_out_channels": [int(w) for w in widths],
      "layers_per_block": per_level,
      "latent_channels": int(own["decoder.conv_in.weight"].shape[1]),
      "norm_num_groups": norm_num_groups,
      "scaling_factor": SD3_SCALING_FACTOR,
      "shift_factor": SD3_SHIFT_FACTOR,
      "use_quant_conv": "quant_conv.weight" in own,
      "use_post_quant_conv": "post_quant_conv.weight" in own,
      "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in own,
  }
  out = {}
  for key, value in own.items():
    name = vae_name_from_original(key, levels)
    out[name] = value.reshape(value.shape[:2]) if ".attentions." in name and value.ndim == 4 else value
  return config, out


def vae_to_original(state_dict: Mapping[str, Any], levels: int, prefix: str = VAE_PREFIX) -> dict[str, np.ndarray]:
  """Inverse of `vae_from_original` for a diffusers AutoencoderKL state dict (e.g. to write an all-in-one file)."""
  ldm = {}
  names = {vae_name_from_original(k, levels): k for k in _ldm_names(state_dict, levels)}
  for name, value in state_dict.items():
    value = np.asarray(value)
    ldm_key = names[name]
    ldm[prefix + ldm_key] = value[:, :, None, None] if ".attentions." in name and value.ndim == 2 else value
  return ldm


def _ldm_names(state_dict, levels: int) -> list[str]:
  """Every LDM name a diffusers VAE's tensors can have (the renames run backwards on the name's pieces)."""
  out = []
  for name in state_dict:
    key = name
    for ldm, diffusers in (
        (".mid.block_1.", ".mid_block.resnets.0."),
        (".mid.block_2.", ".mid_block.resnets.1."),
        (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
        (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
        (".nin_shortcut.", ".conv_shortcut."),
        (".norm_out.", ".conv_norm_out."),
    ):
      key = key.replace(diffusers, ldm)
    key = re.sub(r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1.", key)
    key = re.sub(r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2.", key)
    key = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", key
    )
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.",
        key,
    )
    out.append(key)
  return out


def model_from_original(state_dict: Mapping[str, Any], prefix: str = PREFIX, **overrides: Any) -> mmdit.MMDiT:
  """The MMDiT a released single file holds, read from its tensors' shapes (the head width from the qk-norm scales,
  else SD3's 64; the sin-cos init's base grid, unused by loaded weights, SD3's 64)."""
  own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if "x_embedder.proj.weight" not in own:
    raise ValueError(f"no MM-DiT in the file: no tensor {prefix}x_embedder.proj.weight")
  hidden, in_channels, patch, _ = own["x_embedder.proj.weight"].shape
  depth = len({m.group(1) for k in own if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
  grid = int(round(np.sqrt(own["pos_embed"].shape[1])))
  qk_norm = own.get("joint_blocks.0.x_block.attn.ln_q.weight")
  head_dim = 64 if qk_norm is None else qk_norm.shape[0]  # Without qk-norm no tensor says; SD3's heads are 64 wide.
  return mmdit.MMDiT(
      patch_size=int(patch),
      in_channels=int(in_channels),
      out_channels=int(own["final_layer.linear.weight"].shape[0] // (patch * patch)),
      hidden_size=int(hidden),
      depth=depth,
      num_heads=int(hidden // head_dim),
      mlp_ratio=own["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
      context_dim=int(own["context_embedder.weight"].shape[1]),
      pooled_dim=int(own["y_embedder.mlp.0.weight"].shape[1]),
      pos_embed_max_size=grid,
      qk_norm=None if qk_norm is None else "rms_norm",
      dual_attention_layers=tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in own),
      **overrides,
  )


def load_single_file(path: str | os.PathLike[str], norm_num_groups: int = LDM_GROUPS, **overrides: Any):
  """A released all-in-one .safetensors (Stability's layout): (MMDiT, params, AutoencoderKL, VAE params), checked.

  Text encoders in the file, if any, are not read (a pipeline directory gives them with their tokenizers).
  """
  state_dict = diffusers_io.load_safetensors([pathlib.Path(path)])
  model = model_from_original(state_dict, **overrides)
  params = params_from_original(state_dict, model)
  vae_config, vae_state = vae_from_original(state_dict, norm_num_groups=norm_num_groups)
  vae = export_vae.model_from_diffusers_config(vae_config, **overrides)
  return model, params, vae, export_vae.params_from_diffusers(vae_state, vae, f"{path} ({VAE_PREFIX}*)")
