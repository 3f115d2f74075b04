"""The VAE task: it learns, resumes bitwise through the trainer, its GAN/perceptual/decoder-only paths and guard work,
its bad configs fail in one line, and the vae_recon scores mean what they say."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_vae
from rflow_jax import config_lib
from rflow_jax.eval import vae_recon
from rflow_jax.train import checkpoint, trainer, vae_task


def _config(**overrides):
  c = shapes_vae.get_config("tiny")
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _tree_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _batch(task, seed=0):
  images = vae_recon.heldout_set(2, seed, task.config.data.image_size)[0][: task.config.train.global_batch_size]
  return {"image": jnp.asarray(images)}


@pytest.fixture(scope="module")
def plain():
  task = vae_task.VAETask(_config(**{"optim.learning_rate": 3e-3}))
  return task, jax.jit(task.train_step), nn.meta.unbox(jax.jit(task.init)(jax.random.key(0)))


@pytest.mark.slow
def test_training_lowers_reconstruction_loss(plain):
  task, step, state = plain
  batch = _batch(task)
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics["rec_loss"]))
  assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.slow
def test_nonfinite_batch_leaves_the_state_unchanged(plain):
  task, step, state = plain
  new, metrics = step(state, {"image": jnp.full_like(_batch(task)["image"], jnp.nan)})
  assert float(metrics["nonfinite"]) == 1.0 and int(new.skipped_steps) == 1 and int(new.step) == 1
  assert _tree_equal(new.params, state.params) and _tree_equal(new.ema_params, state.ema_params)


@pytest.mark.slow
def test_resume_through_the_trainer_equals_uninterrupted(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train_and_evaluate(_config(), straight)
  assert os.path.isfile(os.path.join(straight, "samples", "recon_000004.png"))  # The end-of-run preview.
  # The stopped and resumed runs skip that preview (a reconstruction traced per run): the trajectory is the point.
  trainer.train_and_evaluate(_config(**{"train.num_steps": 2, "train.preview_at_end": False}), resumed)
  assert checkpoint.latest_step(resumed) == 2
  assert not os.path.exists(os.path.join(resumed, "samples"))  # train.preview_at_end=False was obeyed.
  trainer.train_and_evaluate(_config(**{"train.preview_at_end": False}), resumed)
  for use_ema in (False, True):
    a, _, step_a = checkpoint.restore_params(straight, use_ema=use_ema)
    b, _, step_b = checkpoint.restore_params(resumed, use_ema=use_ema)
    assert step_a == step_b == 4 and _tree_equal(a, b), f"ema={use_ema}"


def _tiny_perceptual(config):
  """A stand-in perceptual network: squared distance of fixed random conv features."""
  kernel = jax.random.normal(jax.random.key(3), (3, 3, 3, 4)) * 0.3

  def features(x):
    return jax.nn.relu(
        jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )

  del config
  return lambda x, y: jnp.mean((features(x) - features(y)) ** 2, axis=(1, 2, 3))


@pytest.mark.slow
def test_gan_perceptual_and_decoder_only():
  vae_task.register_perceptual("tiny_test_net", _tiny_perceptual)
  task = vae_task.VAETask(
      _config(
          **{
              "vae.disc_weight": 0.5,
              "vae.disc_start": 1,
              "vae.disc_channels": 8,
              "vae.disc_layers": 2,
              "vae.perceptual": "tiny_test_net",
              "vae.perceptual_weight": 1.0,
              "vae.decoder_only": True,
          }
      )
  )
  step = jax.jit(task.train_step)
  state0 = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0)))
  batch = _batch(task)
  state1, m1 = step(state0, batch)  # Step 0 < disc_start: no GAN term, the discriminator is not updated.
  state2, m2 = step(state1, batch)
  state2, _ = step(state2, batch)  # The discriminator's first update has the warmup's learning rate 0.
  assert float(m1["disc_weight"]) == 0.0 and _tree_equal(state1.disc_params, state0.disc_params)
  assert float(m2["disc_weight"]) > 0.0 and not _tree_equal(state2.disc_params, state1.disc_params)
  assert float(m1["perceptual"]) > 0.0 and float(m2["nonfinite"]) == 0.0
  for part in vae_task.ENCODER_PARTS:  # Frozen: the encoder never moves; the decoder does.
    if part in state0.params:
      assert _tree_equal(state2.params[part], state0.params[part])
  assert not _tree_equal(state2.params["decoder"], state0.params["decoder"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.image_size": 40, "vae.block_out_channels": (8, 8, 8, 8, 8)},
            "vae: image size 40x40 is not divisible by the VAE's downsampling factor 16",
        ),
        ({"model.in_channels": 16}, "vae: model.in_channels=16 does not match the VAE's latent_channels=4"),
        ({"vae.perceptual_weight": 1.0, "vae.perceptual": "lpips"}, "vae.perceptual='lpips' is not a registered"),
    ],
)
def test_bad_config_is_one_line(overrides, message):
  with pytest.raises(config_lib.ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    vae_task.VAETask(_config(**overrides))


def test_psnr_and_ssim():
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  np.testing.assert_allclose(vae_recon.ssim(x, x), [1.0, 1.0], rtol=1e-6)
  # An error of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB.
  np.testing.assert_allclose(vae_recon.psnr(x + 0.2, x), [20.0, 20.0], rtol=1e-5)
  assert float(vae_recon.ssim(-x, x).mean()) < 0.1
