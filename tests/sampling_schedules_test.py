"""Tests for rflow_jax.sampling.schedules against diffusers' FlowMatchEulerDiscreteScheduler."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rflow_jax.flow import timesteps
from rflow_jax.sampling import schedules
from rflow_jax.sampling import solvers

CASES = [(1, 1.0), (4, 3.0), (28, 3.0), (50, 1.0), (10, 2.5), (40, 3.0), (7, 0.5)]


@pytest.mark.parametrize("steps,shift", CASES)
def test_diffusers_style_matches_scheduler(steps, shift):
  scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  scheduler.set_timesteps(steps)
  ours = schedules.flow_sigmas(steps, shift, style="diffusers")
  assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
  np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=0, atol=1e-6)
  # The model timestep diffusers feeds the transformer is 1000 σ.
  np.testing.assert_allclose(1000 * ours[:-1], scheduler.timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("steps,shift", CASES)
def test_shifted_linear(steps, shift):
  sigmas = schedules.flow_sigmas(steps, shift)
  assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,)
  assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
  assert np.all(np.diff(sigmas) < 0)
  np.testing.assert_allclose(
      timesteps.unshift(sigmas.astype(np.float64), shift), np.linspace(1, 0, steps + 1), atol=1e-6
  )


def test_diffusers_double_shift_differs_from_clean_grid():
  # Documented oddity of FlowMatchEulerDiscreteScheduler: diffusers shifts twice at the low end.
  clean, diff = schedules.flow_sigmas(28, 3.0), schedules.flow_sigmas(28, 3.0, "diffusers")
  assert abs(clean[-2] - diff[-2]) > 1e-3


def _diffusers_and_ours(steps, shift, stochastic):
  """Runs one fixed velocity field through diffusers' step() loop and through our solver with the same noise."""
  rng = np.random.default_rng(0)
  x_init = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
  w = rng.standard_normal((4,)).astype(np.float32)

  def velocity(x, sigma, lib):
    # A fixed nonlinear field depending on x and σ, written once for both libraries.
    return lib.sin(x * w) * sigma - 0.3 * x + sigma**2

  scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, stochastic_sampling=stochastic)
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(x_init)
  wt = torch.from_numpy(w)
  generator = torch.Generator().manual_seed(0)
  for t in scheduler.timesteps:
    sigma = t / 1000.0
    v = torch.sin(x * wt) * sigma - 0.3 * x + sigma**2
    x = scheduler.step(v, t, x, return_dict=False, generator=generator)[0]

  # The noise diffusers drew at step i (one randn of the sample's shape per step, from the same generator).
  replay = torch.Generator().manual_seed(0)
  noise = jnp.asarray(np.stack([torch.randn(x_init.shape, generator=replay).numpy() for _ in range(steps)]))
  sigmas = jnp.asarray(schedules.flow_sigmas(steps, shift, "diffusers"))
  ours = solvers.sample(
      lambda x, s: velocity(x, s, jnp),
      jnp.asarray(x_init),
      sigmas,
      "euler_stochastic" if stochastic else "euler",
      key=lambda i: noise[i],
  )
  return ours, x.numpy()


@pytest.mark.parametrize("steps,shift", [(5, 3.0), (28, 3.0), (12, 1.0)])
def test_euler_matches_diffusers_step_loop(steps, shift):
  ours, theirs = _diffusers_and_ours(steps, shift, stochastic=False)
  np.testing.assert_allclose(ours, theirs, atol=2e-5)


@pytest.mark.parametrize("steps,shift", [(5, 3.0), (12, 1.0)])
def test_euler_stochastic_matches_diffusers_stochastic_sampling(steps, shift):
  ours, theirs = _diffusers_and_ours(steps, shift, stochastic=True)
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  assert np.abs(ours - _diffusers_and_ours(steps, shift, stochastic=False)[0]).max() > 0.1  # The noise mattered.


def test_errors():
  with pytest.raises(ValueError, match="shifted_linear, diffusers"):
    schedules.flow_sigmas(10, 3.0, "karras")
  with pytest.raises(ValueError, match="num_steps"):
    schedules.flow_sigmas(0)
  with pytest.raises(ValueError, match="shift"):
    schedules.flow_sigmas(4, 0.0)
