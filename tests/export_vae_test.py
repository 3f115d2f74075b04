"""Parity of our AutoencoderKL with diffusers' in both directions, and the VAE directory converters.

Tiny random diffusers AutoencoderKLs (every weight drawn from N(0, 0.3²), so GroupNorm affine terms and biases are
exercised) are loaded with load_vae and run on the same images/latents (NCHW <-> NHWC); our own init is saved with
save_vae and loaded by diffusers.
"""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from rflow_jax.export import load_vae, save_vae
from rflow_jax.export import vae as export_vae
from rflow_jax.model import vae as vae_lib

_BLOCKS = lambda n: dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
CONFIGS = {
    # SD1/SDXL style: quant convs, 1 res block per level, 4 latent channels.
    "quant_lpb1_c4": dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        use_quant_conv=True,
        use_post_quant_conv=True,
        **_BLOCKS(2),
    ),
    # SD3 style: no quant convs, 2 res blocks per level, 16 latent channels, three levels (f=4).
    "sd3like_lpb2_c16": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        **_BLOCKS(3),
    ),
    # Mixed: quant conv only, no mid-block attention, one level (f=1).
    "quant_only_noattn": dict(
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=2,
        latent_channels=4,
        use_quant_conv=True,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        **_BLOCKS(1),
    ),
}
IMAGE = 16
PARITY_RTOL = 1e-5  # fp32: max |ours - diffusers| / max |diffusers|.


def _rel(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _check_parity(torch_model, model, params, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  f = model.downsample_factor
  latents = rng.normal(size=(2, IMAGE // f, IMAGE // f, model.latent_channels)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_model.encode(_nchw(images)).latent_dist
    decoded = torch_model.decode(_nchw(latents)).sample
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, images)
  out = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, latents)
  errors = dict(
      mean=_rel(mean, _nhwc(posterior.mean)),
      logvar=_rel(logvar, _nhwc(posterior.logvar)),
      decode=_rel(out, _nhwc(decoded)),
  )
  assert max(errors.values()) < PARITY_RTOL, errors
  return errors


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def diffusers_dir(request, tmp_path_factory):
  torch.manual_seed(0)
  torch_model = TorchAutoencoderKL(**CONFIGS[request.param]).eval()
  with torch.no_grad():
    for p in torch_model.parameters():
      p.normal_(0.0, 0.3)
  path = tmp_path_factory.mktemp(request.param) / "vae"
  torch_model.save_pretrained(path)
  return request.param, torch_model, path


def test_load_vae_matches_diffusers(diffusers_dir):
  name, torch_model, path = diffusers_dir
  model, params = load_vae(path)
  _check_parity(torch_model, model, params)
  assert model.scaling_factor == torch_model.config.scaling_factor
  assert model.shift_factor == (torch_model.config.shift_factor or 0.0), name


def test_round_trips_are_bitwise(diffusers_dir, tmp_path):
  _, torch_model, path = diffusers_dir
  model, params = load_vae(path)
  save_vae(params, model, tmp_path / "out")
  original = safetensors.numpy.load_file(str(path / "diffusion_pytorch_model.safetensors"))
  written = safetensors.numpy.load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
  assert sorted(original) == sorted(written)
  for k in original:
    np.testing.assert_array_equal(written[k], original[k], err_msg=k)
  _, params_again = load_vae(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_our_init_saved_loads_in_diffusers(tmp_path):
  model = vae_lib.AutoencoderKL(
      block_out_channels=(8, 16),
      layers_per_block=2,
      norm_num_groups=4,
      latent_channels=16,
      scaling_factor=0.7,
      shift_factor=-0.25,
  )
  # Our init's tree and shapes, filled with random values (a fresh init has zero biases and unit norm scales, which
  # would hide a layout error in them; compiling the real init would cost minutes on a loaded CPU).
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), np.zeros((1, IMAGE, IMAGE, 3), np.float32)))
  rng = np.random.RandomState(2)
  params = jax.tree.map(lambda v: (0.3 * rng.normal(size=v.shape)).astype(v.dtype), shapes["params"])
  save_vae(params, model, tmp_path / "vae")
  torch_model = TorchAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
  assert (torch_model.config.scaling_factor, torch_model.config.shift_factor) == (0.7, -0.25)
  _check_parity(torch_model, model, params, seed=1)


def test_pipeline_dir_vae_subfolder(diffusers_dir, tmp_path):
  _, _, path = diffusers_dir
  (tmp_path / "model_index.json").write_text("{}")
  (tmp_path / "vae").symlink_to(path)
  model, _ = load_vae(tmp_path)
  assert model == load_vae(path)[0]


def test_missing_or_misshapen_tensor_is_one_line(diffusers_dir, tmp_path):
  _, _, path = diffusers_dir
  tensors = safetensors.numpy.load_file(str(path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  weights = tmp_path / "diffusion_pytorch_model.safetensors"
  missing = dict(tensors)
  del missing["decoder.conv_out.bias"]
  safetensors.numpy.save_file(missing, str(weights))
  with pytest.raises(ValueError) as e:
    load_vae(tmp_path)
  assert str(e.value) == f"{weights}: missing decoder.conv_out.bias (expected shape (3,))"
  bad = {**tensors, "encoder.conv_in.weight": np.zeros((1, 3, 3, 3), np.float32)}
  safetensors.numpy.save_file(bad, str(weights))
  with pytest.raises(
      ValueError,
      match=r"^\S+diffusion_pytorch_model.safetensors: wrong shape encoder.conv_in.weight: "
      r"expected \(8, 3, 3, 3\), got \(1, 3, 3, 3\)$",
  ):
    load_vae(tmp_path)


def test_refuses_pickle_and_unsupported_configs(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ValueError, match="pickle-based PyTorch checkpoint; refusing to unpickle"):
    load_vae(tmp_path)
  with pytest.raises(ValueError, match="pickle-based"):
    load_vae(tmp_path / "vae.ckpt")
  with pytest.raises(ValueError, match=r"act_fn='gelu': only 'silu'"):
    export_vae.model_from_diffusers_config({"act_fn": "gelu"})
  with pytest.raises(ValueError, match="only 1 x 'UpDecoderBlock2D'"):
    export_vae.model_from_diffusers_config({"up_block_types": ["AttnUpDecoderBlock2D"]})
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    load_vae(tmp_path / "..")


def test_set_latent_factors_rewrites_config(diffusers_dir, tmp_path):
  _, _, path = diffusers_dir
  model, params = load_vae(path)
  save_vae(params, model, tmp_path / "v")
  export_vae.set_latent_factors(tmp_path / "v", 2.5, 0.125)
  model2, params2 = load_vae(tmp_path / "v")
  assert (model2.scaling_factor, model2.shift_factor) == (2.5, 0.125)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
