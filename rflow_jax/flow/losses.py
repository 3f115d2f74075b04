"""Per-example training loss of a formulation and on-device loss statistics binned by time.

The trainer owns parameters, optimizer and conditioning dropout; this module owns what happens between a
clean batch x0 and a (B,) loss: drawing t and ε, building z_t, calling the network with the formulation's
time input, and weighting. Everything here is pure and jit-friendly (no host syncs).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from rflow_jax.flow import formulations

# model_fn(z_t (B, ...), model_time (B,)) -> network output (B, ...); params and conditioning closed over.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def per_example_loss(
    formulation: formulations.Formulation, model_fn: ModelFn, x0: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Draws (t, ε), evaluates the network at z_t and returns the formulation's weighted loss.

  Args:
    formulation: from formulations.get(config.flow.formulation, shift=...); static under jit.
    model_fn: network closure, see ModelFn.
    x0: clean latents (B, ...), e.g. NHWC.
    key: PRNG key for this step (e.g. fold_in(rng, step)).

  Returns:
    (loss (B,) float32, t (B,)) — t is returned for per-t-bin diagnostics.
  """
  t, eps = draw_noise(formulation, key, x0.shape)
  return loss_at(formulation, model_fn, x0, t, eps), t


def draw_noise(
    formulation: formulations.Formulation, key: jax.Array, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
  """The random part of per_example_loss: t (B,) and ε (shape, float32) for a batch of latents of `shape`.

  Drawn for a whole batch at once, so that a batch split into microbatches afterwards sees the same numbers.
  """
  key_t, key_eps = jax.random.split(key)
  return formulation.sample_t(key_t, shape[:1]), jax.random.normal(key_eps, shape, jnp.float32)


def loss_at(
    formulation: formulations.Formulation, model_fn: ModelFn, x0: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
  """The deterministic part of per_example_loss: the weighted loss (B,) of the network at z_t(x0, ε, t)."""
  z_t = formulation.noise(x0.astype(jnp.float32), eps, t).astype(x0.dtype)
  net_out = model_fn(z_t, formulation.model_time(t))
  return formulation.loss(net_out, x0, eps, t, z_t)


def binned_sums(values: jax.Array, t: jax.Array, num_bins: int) -> tuple[jax.Array, jax.Array]:
  """Sums and counts of `values` in num_bins equal-width bins of t ∈ [0, 1] (minRF's `lossbin`).

  Returning (sums, counts) rather than means lets the caller accumulate over steps and devices before
  dividing, and keeps empty bins NaN-free.

  Args:
    values: (B,) per-example values, e.g. losses.
    t: (B,) times in [0, 1].
    num_bins: number of bins.

  Returns:
    (sums (num_bins,), counts (num_bins,)) float32.
  """
  index = jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)
  sums = jax.ops.segment_sum(values.astype(jnp.float32), index, num_segments=num_bins)
  counts = jax.ops.segment_sum(jnp.ones_like(values, jnp.float32), index, num_segments=num_bins)
  return sums, counts
