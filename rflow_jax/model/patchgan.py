"""The PatchGAN discriminator of VAE training (pix2pix's N-layer discriminator, as the LDM autoencoders use it).

One logit per overlapping patch: 4x4 convs, stride 2 for the first `num_layers`, then two stride-1 convs; LeakyReLU
0.2. The LDM code normalises with BatchNorm; GroupNorm is used here instead, so the discriminator keeps no running
statistics and the train step stays a pure function of (state, batch) whatever the batch sharding.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model import vae as vae_lib


class PatchDiscriminator(nn.Module):
  """(B, H, W, C) images in [-1, 1] -> (B, h, w, 1) real/fake logits per patch.

  Attributes:
    channels: width of the first conv (doubled per layer up to 8x).
    num_layers: stride-2 convs (the receptive field grows with each).
    groups: GroupNorm groups of the normalised layers.
  """

  channels: int = 64
  num_layers: int = 3
  groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pad = ((1, 1), (1, 1))
    conv = lambda f, stride, axes, name: vae_lib.conv(f, 4, axes, stride=stride, padding=pad, name=name, **kw)
    x = nn.leaky_relu(conv(self.channels, 2, ("conv_in", "vae_channels"), "conv_0")(jnp.asarray(x, self.dtype)), 0.2)
    for i in range(1, self.num_layers + 1):
      width = self.channels * min(2**i, 8)
      x = conv(width, 2 if i < self.num_layers else 1, ("vae_in", "vae_channels"), f"conv_{i}")(x)
      x = nn.leaky_relu(vae_lib.group_norm(min(self.groups, width), name=f"norm_{i}", **kw)(x), 0.2)
    return conv(1, 1, ("vae_in", "conv_out"), "logits")(x)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: 0.5 · (E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator side of the hinge GAN: -E[D(x̂)]."""
  return -jnp.mean(logits_fake.astype(jnp.float32))
