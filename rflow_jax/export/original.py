"""Conversion between `MMDiT` params and the original SD3 / SD3.5 layout.

The original single-file checkpoints (e.g. sd3.5_large.safetensors, keys under
`model.diffusion_model.`) use Stability's mmditx.py names. Our param tree
follows that layout closely, so this module is only a key table: the array
layouts (Linear transposes, fused qkv, conv) are the shared
`rflow_jax.export.diffusers.LAYOUTS`. Unlike diffusers, the original keeps
(shift, scale) order everywhere, as we do, so nothing is swapped.
"""

from collections.abc import Mapping
import os
import pathlib
from typing import Any

import numpy as np

from rflow_jax.export import diffusers as diffusers_export
from rflow_jax.export import diffusers_io
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
