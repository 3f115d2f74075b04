"""Classifier-free guidance on rf velocities: v = v_u + g (v_c - v_u) (diffusers / sd3.5 convention).

Conditional and unconditional branches run in ONE model call on a batch of 2B (conditional first), which
halves the number of kernel launches and keeps the sampler loop a single traced call.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

# model_fn(x (B', ...), sigma (B',), cond pytree with leading dim B') -> rf velocity (B', ...).
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def cfg_velocity(
    model_fn: ModelFn, cond: Any, uncond: Any, scale: float | jax.Array, interval: tuple[float, float] | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Builds a guided velocity_fn(x, σ) for rflow_jax.sampling.solvers.sample.

  Args:
    model_fn: the conditional velocity model; wrap non-rf models with Formulation.as_velocity_fn first.
    cond: conditioning pytree, every leaf with leading batch dim B.
    uncond: the unconditional ("negative prompt") pytree, same structure; leaves with leading dim 1 are
      broadcast to B.
    scale: guidance scale g; g = 1 returns the conditional velocity, g = 0 the unconditional one.
    interval: optional (σ_lo, σ_hi); guidance applies only for σ_lo ≤ σ ≤ σ_hi and the conditional
      velocity is used elsewhere (guidance interval, Kynkäänniemi et al. 2024). None: everywhere.

  Returns:
    velocity_fn(x (B, ...), σ scalar or (B,)) -> guided velocity (B, ...).
  """
  both = jax.tree.map(
      lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)], axis=0), cond, uncond
  )

  def velocity_fn(x, sigma):
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    v = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0), both)
    v_cond, v_uncond = v[:batch], v[batch:]
    g = jnp.asarray(scale, jnp.float32)
    if interval is not None:
      lo, hi = interval
      g = jnp.where((sigma >= lo) & (sigma <= hi), g, 1.0)
      g = g.reshape((batch,) + (1,) * (x.ndim - 1))
    return v_uncond + g * (v_cond - v_uncond)

  return velocity_fn
