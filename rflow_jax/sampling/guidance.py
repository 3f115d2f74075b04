"""Classifier-free guidance on rf velocities: v = v_u + g (v_c - v_u) (diffusers / sd3.5 convention), optionally
limited to a σ interval, plus SD3.5's skip-layer guidance.

Conditional and unconditional branches run in ONE model call on a batch of 2B (conditional first), which
halves the number of kernel launches and keeps the sampler loop a single traced call.

Skip-layer guidance (diffusers' StableDiffusion3Pipeline `skip_guidance_layers`): at the steps it is active, a second
conditional call with some joint blocks skipped adds s (v_c - v_skip) to the guided velocity. diffusers activates it at
step i of n when n·start < i < n·stop (strict), and only when classifier-free guidance is on (g > 1); `step_sigmas`
turns that rule into the σ interval of a given grid, so the velocity function needs only σ.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# model_fn(x (B', ...), sigma (B',), cond pytree with leading dim B') -> rf velocity (B', ...).
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class SkipLayerGuidance:
  """Skip-layer guidance as diffusers' StableDiffusion3Pipeline.__call__ takes it (its defaults; layers () = off).

  Attributes:
    layers: joint blocks the second call skips (`skip_guidance_layers`; SD3.5 Medium uses (7, 8, 9)).
    scale: s (`skip_layer_guidance_scale`).
    start, stop: the fractions of the steps between which it is active (`skip_layer_guidance_start` / `_stop`).
  """

  layers: tuple[int, ...] = ()
  scale: float = 2.8
  start: float = 0.01
  stop: float = 0.2

  def check(self, depth: int | None = None) -> None:
    """Raises ValueError naming a bad field (before anything compiles); the layers against `depth` when given."""
    bad = [i for i in self.layers if i < 0 or (depth is not None and i >= depth)]
    if bad:
      raise ValueError(f"skip-layer guidance layers {bad} are not joint blocks of a depth-{depth} MM-DiT")
    if not (np.isfinite(self.scale) and 0 <= self.start <= self.stop <= 1):
      raise ValueError(
          f"skip-layer guidance scale={self.scale}, start={self.start}, stop={self.stop}: need a finite "
          "scale and 0 <= start <= stop <= 1"
      )

  def step_sigmas(self, sigmas) -> tuple[float, float] | None:
    """(σ_lo, σ_hi) of the grid `sigmas` (n+1 values) at which diffusers' rule is active; None if at no step."""
    n = len(sigmas) - 1
    steps = [i for i in range(n) if n * self.start < i < n * self.stop]
    if not self.layers or not steps:
      return None
    return float(sigmas[steps[-1]]), float(sigmas[steps[0]])


def cfg_velocity(
    model_fn: ModelFn,
    cond: Any,
    uncond: Any,
    scale: float | jax.Array,
    interval: tuple[float, float] | None = None,
    skip: tuple[ModelFn, float, tuple[float, float]] | None = None,
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
    skip: optional skip-layer guidance (skip_fn, s, (σ_lo, σ_hi)): for σ_lo ≤ σ ≤ σ_hi, s (v_c - skip_fn(x, σ, cond))
      is added; skip_fn is the model with the skipped layers (SkipLayerGuidance.step_sigmas gives the interval).

  Returns:
    velocity_fn(x (B, ...), σ scalar or (B,)) -> guided velocity (B, ...).
  """
  both = jax.tree.map(
      lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)], axis=0), cond, uncond
  )

  def in_range(sigma, lo_hi, ndim):
    lo, hi = lo_hi
    return ((sigma >= lo) & (sigma <= hi)).reshape(sigma.shape + (1,) * (ndim - 1))

  def velocity_fn(x, sigma):
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    v = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([sigma, sigma], axis=0), both)
    v_cond, v_uncond = v[:batch], v[batch:]
    g = jnp.asarray(scale, jnp.float32)
    if interval is not None:
      g = jnp.where(in_range(sigma, interval, x.ndim), g, 1.0)
    out = v_uncond + g * (v_cond - v_uncond)
    if skip is not None:
      skip_fn, s, lo_hi = skip
      active = in_range(sigma, lo_hi, x.ndim)
      # The extra model call runs only at the steps where guidance is active (a real branch under jit).
      extra = jax.lax.cond(
          jnp.any(active),
          lambda: jnp.float32(s) * (v_cond - skip_fn(x, sigma, cond)),
          lambda: jnp.zeros_like(v_cond),
      )
      out = out + jnp.where(active, extra, 0.0).astype(out.dtype)
    return out

  return velocity_fn
