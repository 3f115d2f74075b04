"""Writing our CLIP and T5 encoders as transformers directories: the inverse of rflow_jax/export/text.py's loaders.

  save_clip(params, model, out_dir)   # CLIPTextModelWithProjection (or CLIPTextModel) .from_pretrained(out_dir)
  save_t5(params, model, out_dir)     # T5EncoderModel.from_pretrained(out_dir)

A directory is config.json + model.safetensors (transformers' save_pretrained layout), written to a temporary sibling
and renamed into place. Tensor names and transposes are text.py's entry tables, read the other way, so a save followed
by a load gives back the same arrays.
"""

import os
import pathlib
from typing import Any

import flax
import jax
import numpy as np

from rflow_jax.export import diffusers_io
from rflow_jax.export import text
from rflow_jax.model.text import clip, t5

TRANSFORMERS_VERSION = "5.24.0"  # What wrote the configs these files imitate (informational for transformers).


def clip_hf_config(cfg: clip.CLIPTextConfig, tokenizer=None) -> dict[str, Any]:
  """transformers' config.json of a CLIP text tower (CLIPTextModelWithProjection when it has a projection)."""
  arch = "CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"
  out = {
      "architectures": [arch],
      "model_type": "clip_text_model",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.width,
      "num_hidden_layers": cfg.depth,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.mlp_dim,
      "max_position_embeddings": cfg.max_length,
      "hidden_act": cfg.act,
      "layer_norm_eps": cfg.eps,
      "eos_token_id": cfg.eos_token_id,
      "projection_dim": cfg.projection_dim or cfg.width,
      "torch_dtype": "float32",
      "transformers_version": TRANSFORMERS_VERSION,
  }
  if tokenizer is not None:  # Not part of the function, but transformers reads them for generation defaults.
    out.update(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
  return out


def t5_hf_config(cfg: t5.T5Config) -> dict[str, Any]:
  """transformers' config.json of a T5 encoder (T5EncoderModel)."""
  if cfg.gated:  # transformers reads "gated-gelu" as the tanh gelu of T5 v1.1 (text.t5_config's inverse).
    proj = "gated-gelu" if cfg.act == "gelu_new" else f"gated-{cfg.act}"
  else:
    proj = cfg.act
  return {
      "architectures": ["T5EncoderModel"],
      "model_type": "t5",
      "vocab_size": cfg.vocab_size,
      "d_model": cfg.width,
      "num_layers": cfg.depth,
      "num_heads": cfg.num_heads,
      "d_kv": cfg.head_dim,
      "d_ff": cfg.mlp_dim,
      "feed_forward_proj": proj,
      "relative_attention_num_buckets": cfg.num_buckets,
      "relative_attention_max_distance": cfg.max_distance,
      "layer_norm_epsilon": cfg.eps,
      "is_encoder_decoder": False,
      "use_cache": False,
      "torch_dtype": "float32",
      "transformers_version": TRANSFORMERS_VERSION,
  }


def _unstacked(params: Any, depth: int) -> dict[str, Any]:
  """Host numpy params with layers_0..layers_{depth-1} (the loop layout), from either layout."""
  params = jax.tree.map(np.asarray, jax.device_get(flax.linen.unbox(dict(params))))
  if "layers" in params:  # nn.scan layout: one leading layer axis.
    stacked = params.pop("layers")["layer"]
    for i in range(depth):
      params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def state_dict(params: Any, entries: dict[str, tuple[str, bool]], depth: int) -> dict[str, np.ndarray]:
  """transformers' state dict (C-contiguous numpy) of our params, by one of text.py's entry tables."""
  flat = flax.traverse_util.flatten_dict(_unstacked(params, depth), sep="/")
  missing = sorted(set(entries) - set(flat))
  extra = sorted(set(flat) - set(entries))
  if missing or extra:
    raise ValueError(f"params do not match the encoder's config: missing {missing[:3]}, unexpected {extra[:3]}")
  return {theirs: np.ascontiguousarray(flat[ours].T if t else flat[ours]) for ours, (theirs, t) in entries.items()}


def _write(config: dict[str, Any], tensors: dict[str, np.ndarray], out_dir, overwrite: bool) -> pathlib.Path:
  return diffusers_io.write_model_dir(
      config, tensors, out_dir, overwrite=overwrite, weights_name=text.WEIGHTS_NAME, index_name=text.INDEX_NAME
  )


def save_clip(
    params: Any, model: clip.CLIPText, out_dir: str | os.PathLike[str], tokenizer=None, overwrite: bool = False
) -> pathlib.Path:
  """Writes a CLIP text tower as a transformers directory (CLIPTextModelWithProjection.from_pretrained loads it).

  Args:
    params: its params (either layer layout; boxed or not; host or device).
    model: the CLIPText they belong to.
    out_dir: target directory.
    tokenizer: its tokenizer, for the bos/pad ids in config.json (optional).
    overwrite: replace an existing out_dir.
  """
  cfg = model.cfg
  return _write(
      clip_hf_config(cfg, tokenizer), state_dict(params, text.clip_entries(cfg), cfg.depth), out_dir, overwrite
  )


def save_t5(params: Any, model: t5.T5Encoder, out_dir: str | os.PathLike[str], overwrite: bool = False) -> pathlib.Path:
  """Writes a T5 encoder as a transformers directory (T5EncoderModel.from_pretrained loads it)."""
  cfg = model.cfg
  return _write(t5_hf_config(cfg), state_dict(params, text.t5_entries(cfg), cfg.depth), out_dir, overwrite)
