"""Tests for rflow_jax.sampling.guidance: CFG algebra, one batched model call, guidance interval."""

import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.sampling import guidance
from rflow_jax.sampling import schedules
from rflow_jax.sampling import solvers


def _model(x, sigma, cond):
  """A toy conditional velocity: depends on x, σ and both conditioning leaves."""
  return jnp.tanh(x) * sigma[:, None] + cond["vec"] + cond["ctx"].sum(axis=1)


def _conds(batch=3):
  key1, key2 = jax.random.split(jax.random.key(0))
  cond = {"vec": jax.random.normal(key1, (batch, 4)), "ctx": jax.random.normal(key2, (batch, 2, 4))}
  uncond = {"vec": jnp.zeros((1, 4)), "ctx": jnp.ones((1, 2, 4))}  # broadcast from batch 1
  return cond, uncond


def test_scale_one_is_conditional_and_zero_is_unconditional():
  cond, uncond = _conds()
  x, sigma = jnp.linspace(-1, 1, 12).reshape(3, 4), jnp.float32(0.4)
  sig = jnp.full((3,), 0.4)
  v_cond = _model(x, sig, cond)
  v_uncond = _model(x, sig, jax.tree.map(lambda u: jnp.broadcast_to(u, (3,) + u.shape[1:]), uncond))
  np.testing.assert_allclose(guidance.cfg_velocity(_model, cond, uncond, 1.0)(x, sigma), v_cond, atol=1e-6)
  np.testing.assert_allclose(guidance.cfg_velocity(_model, cond, uncond, 0.0)(x, sigma), v_uncond, atol=1e-6)
  np.testing.assert_allclose(
      guidance.cfg_velocity(_model, cond, uncond, 5.0)(x, sigma), v_uncond + 5.0 * (v_cond - v_uncond), atol=1e-5
  )


def test_single_batched_call():
  cond, uncond = _conds()
  batches = []

  def model(x, sigma, c):
    batches.append((x.shape[0], sigma.shape[0], c["vec"].shape[0]))
    return _model(x, sigma, c)

  guidance.cfg_velocity(model, cond, uncond, 4.0)(jnp.zeros((3, 4)), 0.5)
  assert batches == [(6, 6, 6)]


def test_interval_switches_guidance_off_outside():
  cond, uncond = _conds()
  x = jnp.ones((3, 4))
  full = guidance.cfg_velocity(_model, cond, uncond, 3.0)
  plain = guidance.cfg_velocity(_model, cond, uncond, 1.0)
  windowed = guidance.cfg_velocity(_model, cond, uncond, 3.0, interval=(0.2, 0.6))
  np.testing.assert_allclose(windowed(x, 0.4), full(x, 0.4), atol=1e-6)
  np.testing.assert_allclose(windowed(x, 0.9), plain(x, 0.9), atol=1e-6)


def test_guided_sampling_jits():
  cond, uncond = _conds()
  sigmas = jnp.asarray(schedules.flow_sigmas(6, 3.0))
  run = jax.jit(lambda x, c, u, g: solvers.sample(guidance.cfg_velocity(_model, c, u, g), x, sigmas, "heun"))
  out = run(jnp.ones((3, 4)), cond, uncond, 4.0)
  # Guidance scale 1 through the whole solver equals sampling the conditional model.
  cond_only = solvers.sample(lambda x, s: _model(x, jnp.full((3,), s), cond), jnp.ones((3, 4)), sigmas, "heun")
  np.testing.assert_allclose(run(jnp.ones((3, 4)), cond, uncond, 1.0), cond_only, atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(out)))
