"""The backbones' shared front end: image patches + positions, time, pooled-text and context embeddings, unpatchify.

The MM-DiT and the RQ2 baselines embed their inputs identically (same param names, shapes and inits), so a comparison
between them changes only how text and image tokens interact. Each function is called from inside a Linen module's
compact `__call__` with that module as `module`: the params and submodules it creates belong to that module
(`patch_embed`, `pos_embed`, `t_embedder`, `y_embedder`, `context_embedder`), and the module's attributes
(patch_size, hidden_size, pos_embed_max_size, pos_embed_base, output_channels, dtype, param_dtype) configure them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model import embeddings
from rflow_jax.model import layers

# Params never trained: the positional table is a fixed buffer in SD3 (diffusers registers it as a buffer).
FROZEN_PARAMS = ("pos_embed",)


def is_frozen(path) -> bool:
  """Whether the param at a pytree key path (jax.tree_util) is one of FROZEN_PARAMS."""
  return any(getattr(k, "key", None) in FROZEN_PARAMS for k in path)


def constrain(x: jax.Array) -> jax.Array:
  """Token activations (B, length, H) sharded on the batch and embed axes."""
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def pos_table_init(hidden_size: int, max_size: int, base_size: int):
  """Initializer returning the fixed 2D sin-cos table; ignores the rng."""

  def init(rng, shape, dtype=jnp.float32):
    del rng
    if shape != (max_size * max_size, hidden_size):
      raise ValueError(f"pos table shape {shape} != {(max_size * max_size, hidden_size)}")
    return embeddings.sincos_2d_table(hidden_size, max_size, base_size, xp=jnp).astype(dtype)

  return init


def _dense(module: nn.Module, features: int, axes, name: str) -> layers.Dense:
  return layers.Dense(features, axes, dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def image_tokens(module: nn.Module, x: jax.Array) -> tuple[jax.Array, int, int]:
  """(B, H, W, C) -> patch tokens plus their centre-cropped sin-cos positions (B, h·w, hidden), and (h, w)."""
  patches = embeddings.patchify(x, module.patch_size)  # (B, h, w, p*p*C)
  b, h, w, _ = patches.shape
  tokens = _dense(module, module.hidden_size, ("patch", "embed"), "patch_embed")(
      patches.reshape(b, h * w, -1)
  )  # (B, T, H)
  table = module.param(
      "pos_embed",
      nn.with_logical_partitioning(
          pos_table_init(module.hidden_size, module.pos_embed_max_size, module.pos_embed_base), ("pos", "embed")
      ),
      (module.pos_embed_max_size**2, module.hidden_size),
      module.param_dtype,
  )
  pos = embeddings.crop_pos_table(table, module.pos_embed_max_size, h, w)
  tokens = tokens + pos.astype(module.dtype)[None]  # (B, T, H)
  return constrain(tokens), h, w


def time_embedding(module: nn.Module, t: jax.Array) -> jax.Array:
  """(B,) times -> (B, hidden) float32: MLP of the 256-d sinusoid of 1000·t (`t_embedder`)."""
  return embeddings.MlpEmbedder(
      module.hidden_size, kernel_init=nn.initializers.normal(0.02), param_dtype=module.param_dtype, name="t_embedder"
  )(embeddings.timestep_embedding(t))


def pooled_embedding(module: nn.Module, pooled: jax.Array) -> jax.Array:
  """(B, pooled_dim) -> (B, hidden) float32 (`y_embedder`)."""
  return embeddings.MlpEmbedder(module.hidden_size, param_dtype=module.param_dtype, name="y_embedder")(
      pooled.astype(jnp.float32)
  )


def context_tokens(module: nn.Module, context: jax.Array) -> jax.Array:
  """(B, L, context_dim) -> (B, L, hidden) (`context_embedder`; no positions: the text encoders encode order)."""
  return constrain(_dense(module, module.hidden_size, ("cond", "embed"), "context_embedder")(context))


def unpatchify(module: nn.Module, out: jax.Array, h: int, w: int) -> jax.Array:
  """(B, h·w, p·p·out) -> (B, h·p, w·p, out)."""
  return embeddings.unpatchify(out.reshape(out.shape[0], h, w, -1), module.patch_size, module.output_channels)
