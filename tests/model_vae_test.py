"""Our AutoencoderKL on its own: the SD3 configuration's size against diffusers', annotations, the normalisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from rflow_jax.model import vae as vae_lib
from rflow_jax.sharding import rules


def _abstract(model, size=8):
  return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def test_sd3_parameter_count_equals_diffusers():
  model = vae_lib.AutoencoderKL()  # Defaults are SD3's: (128, 256, 512, 512), 2 res blocks, 16 latents, no quant.
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(_abstract(model))))
  with torch.device("meta"):
    theirs = TorchAutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
  assert ours == sum(p.numel() for p in theirs.parameters())  # 83,819,683


def test_every_param_has_known_logical_axes():
  model = vae_lib.AutoencoderKL(
      block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True
  )
  boxed = _abstract(model)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  names = {n for x in leaves for n in x.names if n is not None}
  assert names == {"vae_channels", "vae_in", "conv_in", "conv_out"} and names <= set(rules.LOGICAL_AXES)
  for preset in rules.PRESETS:  # Every preset maps them (to a mesh axis or to None).
    assert names <= {logical for logical, _ in rules.get_rules(preset)}, preset


def test_latent_normalisation_is_invertible_and_sd3s():
  x = jnp.linspace(-3.0, 3.0, 7)
  z = vae_lib.normalize_latents(x, vae_lib.SD3_SCALING_FACTOR, vae_lib.SD3_SHIFT_FACTOR)
  np.testing.assert_allclose(z, (x - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(vae_lib.denormalize_latents(z, 1.5305, 0.0609), x, rtol=1e-6, atol=1e-6)


def test_kl_of_standard_normal_is_zero():
  mean, logvar = jnp.zeros((2, 2, 2, 4)), jnp.zeros((2, 2, 2, 4))
  np.testing.assert_array_equal(vae_lib.kl_divergence(mean, logvar), [0.0, 0.0])
  np.testing.assert_allclose(vae_lib.kl_divergence(mean + 1.0, logvar), [8.0, 8.0])  # 0.5 * 16 elements * 1².


def test_bad_sizes_are_one_line():
  model = vae_lib.AutoencoderKL(block_out_channels=(8, 16, 16, 16), norm_num_groups=4)
  with pytest.raises(ValueError, match=r"^image size 60x64 is not divisible by the VAE's downsampling factor 8 "):
    model.check_image_size(60, 64)
  with pytest.raises(ValueError, match=r"^model.in_channels=4 does not match the VAE's latent_channels=16"):
    vae_lib.check_latent_channels(16, 4)
  with pytest.raises(ValueError, match=r"width 12 is not divisible by norm_num_groups=8"):
    vae_lib.AutoencoderKL(block_out_channels=(8, 12), norm_num_groups=8).check_config()
