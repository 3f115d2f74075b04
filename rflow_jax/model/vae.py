"""The KL autoencoder of latent diffusion (SD/SDXL/SD3's VAE): encoder, decoder and the latent normalisation.

Same function as diffusers' `AutoencoderKL` with DownEncoderBlock2D / UpDecoderBlock2D blocks (the layout every SD
VAE uses), so weights convert exactly (rflow_jax/export/vae.py). Images are NHWC in [-1, 1]; latents are NHWC.

  encoder: conv_in -> per level: `layers_per_block` res blocks (+ a stride-2 downsample except at the last level)
           -> mid (res, single-head self-attention, res) -> GroupNorm, SiLU, conv_out to 2·latent_channels
           -> quant_conv (1x1, optional) -> (mean, logvar), logvar clamped to [-30, 20].
  decoder: post_quant_conv (1x1, optional) -> conv_in -> mid -> per level (widest first): `layers_per_block + 1` res
           blocks (+ nearest x2 upsample and a conv except at the last level) -> GroupNorm, SiLU, conv_out.

The downsampling factor is 2^(len(block_out_channels) - 1) (8 for SD3's four levels).

Latent normalisation, the one place it is defined: the MM-DiT sees z = (x - shift_factor) * scaling_factor, where x
is a latent drawn from the encoder's posterior; decoding inverts it first. SD3 uses shift 0.0609 and scale 1.5305
(the mean and 1/std of its latents over training data, arXiv 2403.03206 §5.2.1); `python -m
rflow_jax.export.latent_stats` measures them for a VAE of ours.

Logical axes of the parameters: "vae_channels" (the hidden width a layer writes), "vae_in" (the hidden width a kernel
reads), "conv_in" / "conv_out" (image or latent channels a conv reads / writes); spatial kernel axes are never
sharded.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# diffusers' AutoencoderKL uses this GroupNorm epsilon everywhere (resnet_eps=1e-6).
NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # The posterior's logvar clamp (diffusers' DiagonalGaussianDistribution).
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


def normalize_latents(x: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
  """VAE latent -> what the MM-DiT trains on: (x - shift) * scale."""
  return (x - shift_factor) * scaling_factor


def denormalize_latents(z: jax.Array, scaling_factor: float, shift_factor: float) -> jax.Array:
  """Inverse of `normalize_latents`: MM-DiT latent -> VAE latent for the decoder."""
  return z / scaling_factor + shift_factor


def conv(
    features: int,
    kernel: int,
    axes: tuple[str | None, str | None],
    *,
    stride: int = 1,
    padding: Any = "SAME",
    dtype,
    param_dtype,
    name: str,
) -> nn.Conv:
  """A Conv whose kernel (kh, kw, in, out) carries the logical axes (None, None, *axes)."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=padding,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None) + axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
  )


def group_norm(groups: int, dtype, param_dtype, name: str) -> nn.GroupNorm:
  """GroupNorm(eps 1e-6) over NHWC channels with logically annotated scale and bias."""
  # Two-pass variance (use_fast_variance=False) as torch computes it: E[x²]-E[x]² loses digits when |mean| >> std.
  return nn.GroupNorm(
      num_groups=groups,
      epsilon=NORM_EPS,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("vae_channels",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vae_channels",)),
  )


class ResBlock(nn.Module):
  """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus the input (through a 1x1 conv if widths differ)."""

  features: int
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C_in) -> (B, H, W, features)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(self.groups, name="norm1", **kw)(x))
    h = conv(self.features, 3, ("vae_in", "vae_channels"), name="conv1", **kw)(h)
    h = nn.silu(group_norm(self.groups, name="norm2", **kw)(h))
    h = conv(self.features, 3, ("vae_in", "vae_channels"), name="conv2", **kw)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, ("vae_in", "vae_channels"), name="conv_shortcut", **kw)(x)
    return x + h


class MidAttention(nn.Module):
  """Single-head self-attention over all H·W positions, GroupNorm first, residual added (the VAE mid block's)."""

  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C)
    b, hh, ww, c = x.shape
    dense = lambda name: nn.Dense(
        c,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("vae_in", "vae_channels")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vae_channels",)),
    )
    h = group_norm(self.groups, self.dtype, self.param_dtype, "norm")(x).reshape(b, hh * ww, c)  # (B, T, C)
    q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)
    logits = jnp.einsum("btc,bsc->bts", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # float32 softmax (diffusers upcasts it too).
    out = dense("proj")(jnp.einsum("bts,bsc->btc", probs, v))
    return x + out.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
  """res, (attention), res at the lowest resolution."""

  groups: int
  attention: bool
  res_block: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self.res_block(x.shape[-1], self.groups, name="res_0", **kw)(x)
    if self.attention:
      x = MidAttention(self.groups, name="attn", **kw)(x)
    return self.res_block(x.shape[-1], self.groups, name="res_1", **kw)(x)


class _Tower(nn.Module):
  """What encoder and decoder share: the level widths, res blocks per level and the mid block's settings."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  attention: bool
  res_block: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class Encoder(_Tower):
  """Image (B, H, W, C) -> 2·latent_channels moments at (H/f, W/f)."""

  latent_channels: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.block_out_channels[0], 3, ("conv_in", "vae_channels"), name="conv_in", **kw)(x)
    for i, ch in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        x = self.res_block(ch, self.groups, name=f"down_{i}_res_{j}", **kw)(x)
      if i < len(self.block_out_channels) - 1:
        # Pad one row/column at the bottom/right only, then a VALID stride-2 conv (the SD VAE's asymmetric padding).
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = conv(ch, 3, ("vae_in", "vae_channels"), stride=2, padding="VALID", name=f"down_{i}_downsample", **kw)(x)
    x = MidBlock(self.groups, self.attention, self.res_block, name="mid", **kw)(x)
    x = nn.silu(group_norm(self.groups, name="norm_out", **kw)(x))
    return conv(2 * self.latent_channels, 3, ("vae_in", "conv_out"), name="conv_out", **kw)(x)


class Decoder(_Tower):
  """Latent (B, h, w, latent_channels) -> image (B, h·f, w·f, out_channels)."""

  out_channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    widths = list(reversed(self.block_out_channels))
    x = conv(widths[0], 3, ("conv_in", "vae_channels"), name="conv_in", **kw)(z)
    x = MidBlock(self.groups, self.attention, self.res_block, name="mid", **kw)(x)
    for i, ch in enumerate(widths):
      for j in range(self.layers_per_block + 1):
        x = self.res_block(ch, self.groups, name=f"up_{i}_res_{j}", **kw)(x)
      if i < len(widths) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
        x = conv(ch, 3, ("vae_in", "vae_channels"), name=f"up_{i}_upsample", **kw)(x)
    x = nn.silu(group_norm(self.groups, name="norm_out", **kw)(x))
    return conv(self.out_channels, 3, ("vae_in", "conv_out"), name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL (DownEncoderBlock2D/UpDecoderBlock2D), NHWC.

  Attributes:
    block_out_channels: width of each level (SD3: (128, 256, 512, 512)).
    layers_per_block: res blocks per encoder level (the decoder has one more per level).
    norm_num_groups: GroupNorm groups (must divide every width).
    latent_channels: channels of the latent (SD3: 16).
    in_channels / out_channels: image channels.
    use_quant_conv / use_post_quant_conv: the 1x1 convs after the encoder / before the decoder (SD3: off).
    mid_block_attention: self-attention in the mid blocks.
    scaling_factor / shift_factor: the latent normalisation (see normalize_latents).
    remat: rematerialise each res block in the backward pass (for high resolutions).
    dtype / param_dtype: compute / storage dtypes.
  """

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  latent_channels: int = 16
  in_channels: int = 3
  out_channels: int = 3
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_attention: bool = True
  scaling_factor: float = SD3_SCALING_FACTOR
  shift_factor: float = SD3_SHIFT_FACTOR
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def check_config(self) -> None:
    """Raises ValueError naming the first attribute that cannot build a model."""
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
          f"VAE block_out_channels={tuple(self.block_out_channels)}: width {bad[0]} is not divisible by "
          f"norm_num_groups={self.norm_num_groups}"
      )
    if self.latent_channels <= 0 or self.layers_per_block <= 0:
      raise ValueError(
          f"VAE latent_channels={self.latent_channels} and layers_per_block={self.layers_per_block} " "must be positive"
      )

  def check_image_size(self, height: int, width: int) -> None:
    """Raises ValueError unless both sides are divisible by the downsampling factor."""
    f = self.downsample_factor
    if height % f or width % f:
      raise ValueError(
          f"image size {height}x{width} is not divisible by the VAE's downsampling factor {f} "
          f"(2^(len(block_out_channels)-1) for block_out_channels={tuple(self.block_out_channels)})"
      )

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    res_block = nn.remat(ResBlock) if self.remat else ResBlock
    common = dict(
        block_out_channels=tuple(self.block_out_channels),
        layers_per_block=self.layers_per_block,
        groups=self.norm_num_groups,
        attention=self.mid_block_attention,
        res_block=res_block,
        **kw,
    )
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    lc = self.latent_channels
    if self.use_quant_conv:
      self.quant_conv = conv(2 * lc, 1, ("conv_in", "conv_out"), name="quant_conv", **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(lc, 1, ("conv_in", "conv_out"), name="post_quant_conv", **kw)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each (B, H/f, W/f, latent_channels)."""
    moments = self.encoder(jnp.asarray(images, self.dtype))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)  # diffusers: the first half of the channels is the mean.
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, latents: jax.Array) -> jax.Array:
    """(B, h, w, latent_channels) VAE latents (not normalised) -> (B, h·f, w·f, out_channels) images."""
    latents = jnp.asarray(latents, self.dtype)
    if self.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images: jax.Array, key: jax.Array | None = None):
    """Reconstruction through a posterior sample (the mean when `key` is None); returns (images, mean, logvar)."""
    mean, logvar = self.encode(images)
    latents = mean if key is None else sample_posterior(mean, logvar, key)
    return self.decode(latents), mean, logvar


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """x = mean + exp(logvar / 2) · ε, ε ~ N(0, I) (float32 noise, cast to the moments' dtype)."""
  eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Per-example KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements: shape (B,)."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))


def check_latent_channels(latent_channels: int, in_channels: int) -> None:
  """Raises ValueError when an MM-DiT reading this VAE's latents has a different input width."""
  if latent_channels != in_channels:
    raise ValueError(
        f"model.in_channels={in_channels} does not match the VAE's latent_channels={latent_channels}: "
        "an MM-DiT on VAE latents reads exactly the latent channels"
    )
