"""Gradient accumulation (train.microbatches): one accumulated step equals the single big step; resume is bitwise."""

import glob
import os

import jax
import numpy as np
import pytest

from configs import debug
from rflow_jax import config_lib
from rflow_jax.train import checkpoint, trainer

# Float32 throughout (the debug config); the accumulated step differs from the big one only in summation order
# (gradients summed over microbatches, matmuls blocked by batch size).
RTOL, ATOL = 1e-5, 1e-7


def _config(microbatches, global_batch_size=8):
  c = debug.get_config()
  c.train.global_batch_size = global_batch_size
  c.train.microbatches = microbatches
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  g, s = config.train.global_batch_size, config.data.image_size
  return {
      "image": rng.uniform(-1, 1, (g, s, s, config.model.in_channels)).astype(np.float32),
      "tokens": rng.integers(1, 20, (g, config.text.max_length)).astype(np.int32),
  }


def _one_step(microbatches):
  """(state after one step, its metrics) from the same init and batch, with the batch in `microbatches` pieces."""
  setup = trainer.Setup(_config(microbatches), devices=jax.devices()[:1])
  state = setup.init_state()
  new_state, metrics = setup.step(state, setup.global_batch(_batch(setup.config)))
  return jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.slow
def test_accumulated_step_equals_the_single_big_step():
  big_state, big_metrics = _one_step(1)
  state, metrics = _one_step(4)  # 2 examples per microbatch.
  assert set(metrics) == set(big_metrics)
  for k in big_metrics:  # loss, grad/update/param norms and the per-t-bin losses loss_t0..3.
    np.testing.assert_allclose(metrics[k], big_metrics[k], rtol=RTOL, atol=ATOL, err_msg=k)
  assert metrics["loss_t0"] != 0 or metrics["loss_t3"] != 0  # The bins are populated.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
      (state.params, state.opt_state, state.ema_params),
      (big_state.params, big_state.opt_state, big_state.ema_params),
  )
  assert int(state.step) == 1


def test_microbatches_must_divide_the_data_shard():
  c = _config(3)
  with pytest.raises(
      config_lib.ConfigError,
      match=r"^train.microbatches=3 does not divide the 8 examples per " r"process \(train.global_batch_size=8\)$",
  ):
    config_lib.validate(c)


@pytest.mark.slow
def test_resume_with_microbatches_is_bitwise_and_the_profiler_traces_steps_2_to_3(tmp_path):
  # 4 microbatches: the accumulated step of the test above, so one compile serves both. Sampling is tested elsewhere
  # (train_test.py); here the end-of-run previews would only add a sampler trace per run.
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  c = _config(4)
  c.train.preview_at_end = False
  c.train.profile_steps = (2, 3)  # Tracing must not change the trajectory either.
  trainer.train_and_evaluate(c, straight)
  assert len(glob.glob(os.path.join(straight, "profile", "plugins", "profile", "*", "*.xplane.pb"))) == 1
  c2 = _config(4)
  c2.train.num_steps = 2
  trainer.train_and_evaluate(c2, resumed)
  assert checkpoint.latest_step(resumed) == 2
  trainer.train_and_evaluate(_config(4), resumed)
  a, _, _ = checkpoint.restore_params(straight, use_ema=False)
  b, _, _ = checkpoint.restore_params(resumed, use_ema=False)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
  assert not os.path.exists(os.path.join(resumed, "profile"))  # Off by default.
