"""Input embeddings of the MM-DiT: patches, positions, timesteps, vectors.

Conventions (one place for each):
- Time t in [0, 1] (t=0 data, t=1 noise) enters the network as the sinusoid of
  `TIMESTEP_SCALE * t`, i.e. the 1000*sigma "timestep" that diffusers feeds its
  SD3 transformer; frequencies exp(-ln(10000) i / 128), order [cos, sin].
- Patches are flattened in (p_row, p_col, channel) order, channel fastest: this
  equals a stride-p conv with kernel (p, p, C, H) and makes the final
  projection's output features unpatchify like diffusers' proj_out.
- The 2D sin-cos table is diffusers' `get_2d_sincos_pos_embed` on an (M, M)
  grid: the first half of the channels encodes the column (w), the second half
  the row (h); each half is [sin, cos].
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.model import layers

# The network sees 1000 * t (diffusers: timestep = 1000 * sigma).
TIMESTEP_SCALE = 1000.0
# Width of the sinusoidal timestep features (diffusers Timesteps(256, ...)).
TIMESTEP_FREQ_DIM = 256
_MAX_PERIOD = 10000.0


def timestep_embedding(t: jax.Array, dim: int = TIMESTEP_FREQ_DIM) -> jax.Array:
  """Sinusoidal features of TIMESTEP_SCALE * t, [cos, sin] order, float32.

  Matches diffusers `Timesteps(dim, flip_sin_to_cos=True,
  downscale_freq_shift=0)` applied to timestep = 1000 * t.

  Args:
    t: (B,) times in [0, 1].
    dim: even number of output features.

  Returns:
    (B, dim) float32 features.
  """
  layers.check_divisible("timestep embedding dim", dim, "2", 2)
  half = dim // 2
  # Constant frequencies computed on the host: exp in float64 rounded to
  # float32 agrees with torch's float32 exp (XLA's differs by ~1 ulp, which
  # at timestep 1000 shifts the phase by ~1e-4).
  exponent = np.float32(-np.log(_MAX_PERIOD)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # (half,)
  timestep = t.astype(jnp.float32) * TIMESTEP_SCALE
  args = timestep[:, None] * freqs[None, :]  # (B, half)
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """1D sin-cos features [sin, cos] of positions, float64; (len(pos), D)."""
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega  # (D/2,)
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(
    embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0, xp: Any = np
) -> Any:
  """The (grid_size**2, embed_dim) float32 2D sin-cos positional table.

  Same numbers as diffusers' PatchEmbed buffer for SD3: grid coordinate
  arange(M) / (M / base_size) / interpolation_scale along each axis.

  Args:
    embed_dim: table width H, divisible by 4.
    grid_size: M, the side of the square grid.
    base_size: grid units that span the base resolution (diffusers:
      sample_size // patch_size, 64 for SD3).
    interpolation_scale: extra divisor of the coordinates (1 for SD3).
    xp: array module that assembles the table: numpy, or jax.numpy so that
      the big table stays abstract under jax.eval_shape.

  Returns:
    (M * M, H) float32 array, rows in row-major (h, w) order.
  """
  layers.check_divisible("pos embed width", embed_dim, "4", 4)
  coords = (
      np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size) / np.float32(interpolation_scale)
  )  # (M,)
  # Both axes use the same M coordinates: compute the 1D features once (in
  # float64, as diffusers does) and broadcast them over the other axis.
  emb = xp.asarray(sincos_1d(embed_dim // 2, coords).astype(np.float32))
  shape = (grid_size, grid_size, embed_dim // 2)
  emb_w = xp.broadcast_to(emb[None, :, :], shape)  # (M, M, H/2), varies in w
  emb_h = xp.broadcast_to(emb[:, None, :], shape)  # (M, M, H/2), varies in h
  table = xp.concatenate([emb_w, emb_h], axis=-1)  # (M, M, H)
  return table.reshape(grid_size * grid_size, embed_dim)


def crop_pos_table(table: jax.Array, max_size: int, h: int, w: int) -> jax.Array:
  """Center crop of an (M*M, H) table to an (h, w) grid -> (h*w, H).

  Args:
    table: (M*M, H) positional table.
    max_size: M.
    h: patch-grid height.
    w: patch-grid width.

  Returns:
    (h * w, H) rows for the grid in row-major order.
  """
  if h > max_size or w > max_size:
    raise ValueError(
        f"patch grid {h}x{w} exceeds pos_embed_max_size=" f"{max_size}; use smaller latents or a larger table"
    )
  top, left = (max_size - h) // 2, (max_size - w) // 2
  grid = table.reshape(max_size, max_size, table.shape[-1])  # (M, M, H)
  grid = jax.lax.slice(grid, (top, left, 0), (top + h, left + w, grid.shape[-1]))  # (h, w, H)
  return grid.reshape(h * w, table.shape[-1])  # (h*w, H)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C), features in (p_row, p_col, c).

  Raises:
    ValueError: naming the latent size that p does not divide.
  """
  b, height, width, c = x.shape
  layers.check_divisible("latent height", height, "patch_size", p)
  layers.check_divisible("latent width", width, "patch_size", p)
  x = x.reshape(b, height // p, p, width // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
  return x.reshape(b, height // p, width // p, p * p * c)


def unpatchify(x: jax.Array, p: int, c: int) -> jax.Array:
  """(B, h, w, p*p*C) -> (B, h*p, w*p, C); inverse of `patchify`."""
  b, h, w, _ = x.shape
  x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (B,h,p,w,p,C)
  return x.reshape(b, h * p, w * p, c)


class MlpEmbedder(nn.Module):
  """Dense(cond -> H) - SiLU - Dense(H -> H) for timestep / pooled vectors.

  Runs in float32: its inputs are (B, d) vectors, so the cost is negligible
  and the conditioning feeds every modulation.
  """

  hidden_size: int
  kernel_init: layers.Initializer = layers.xavier_uniform()
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda axes, name: layers.Dense(
        self.hidden_size, axes, kernel_init=self.kernel_init, dtype=jnp.float32, param_dtype=self.param_dtype, name=name
    )
    h = dense(("cond", "mlp"), "fc1")(x)  # (B, H)
    return dense(("mlp", "embed"), "fc2")(nn.silu(h))  # (B, H)
