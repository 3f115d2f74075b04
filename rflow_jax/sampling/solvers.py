"""ODE solvers for the rf probability-flow ODE dx/dσ = v(x, σ), integrated from σ_0 ≈ 1 (noise) to σ_n = 0.

Conventions are those of rflow_jax/flow/paths.py: x = (1-σ) x0 + σ ε, v ≈ ε - x0, x̂0 = x - σ v. A model
trained with any formulation becomes a `velocity_fn` via Formulation.as_velocity_fn, and CFG via
sampling.guidance.cfg_velocity.

Solvers (each a single lax.fori_loop over the steps, so `sample` jits once per (shape, n, solver)):
  "euler":    x ← x + (σ_{i+1} - σ_i) v(x, σ_i). Same as diffusers' FlowMatchEulerDiscreteScheduler.step.
  "heun":     2nd-order trapezoidal corrector (Karras et al. 2022, Alg. 1); the final step to σ = 0 is
              plain Euler, because v at σ = 0 is the (undefined-in-general) data score limit and costs an
              extra model call for no accuracy gain.
  "dpmpp_2m": DPM-Solver++(2M) in data-prediction form (Lu et al. 2022) on the rf path with α_σ = 1 - σ and
              λ = log((1-σ)/σ). With D the (2M-corrected) x̂0:
                x_{i+1} = (σ_{i+1}/σ_i)(x_i - α_i D) + α_{i+1} D    (= σ_{i+1}/σ_i x_i - α_{i+1}(e^{-h}-1) D)
                D = x̂0_i + (h_i / (2 h_{i-1})) (x̂0_i - x̂0_{i-1}),  h_i = λ_{i+1} - λ_i,
              first-order (D = x̂0_i) on the first step and on a final step to σ = 0. Starting at σ_0 = 1
              gives λ_0 = -∞, so the second step's correction weight h_1/(2h_0) is 0 as well; no log of 0
              enters the update itself.
  "euler_stochastic": x̂0 = x - σ_i v(x, σ_i), then x ← (1 - σ_{i+1}) x̂0 + σ_{i+1} ξ_i with FRESH noise ξ_i: every
              step puts x where the rf path would be at σ_{i+1} if x̂0 were the data, forgetting the noise the
              trajectory carried so far (so it is not exact even for a perfect model: docs/formulations.md).
              Same as diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).step. An imperfect
              model's ODE trajectory carries its errors (a square's edge drawn twice, an object begun twice) to
              σ = 0; re-noising lets later, better-informed steps redraw them (on the 20000-step shapes run it
              lifts ShapesEval from 0.62 to 0.79: README, "What quality to expect"). Needs a key: noise ξ_i for
              example b is normal(fold_in(key_b, i)), so a batch of per-example keys makes each sample
              independent of how examples were batched.
"""

from typing import Callable, Union

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
NoiseFn = Callable[[jax.Array], jax.Array]  # Step index i -> fresh standard-normal noise shaped like x.

SOLVERS = ("euler", "heun", "dpmpp_2m", "euler_stochastic")
STOCHASTIC = ("euler_stochastic",)  # Solvers that draw fresh noise every step and so need `key`.


def _euler(velocity_fn: VelocityFn, x: jax.Array, sigmas: jax.Array) -> jax.Array:
  def body(i, x):
    s, s_next = sigmas[i], sigmas[i + 1]
    return x + (s_next - s) * velocity_fn(x, s)

  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


def _heun(velocity_fn: VelocityFn, x: jax.Array, sigmas: jax.Array) -> jax.Array:
  def body(i, x):
    s, s_next = sigmas[i], sigmas[i + 1]
    d = velocity_fn(x, s)
    x_euler = x + (s_next - s) * d

    def corrected(x_euler):
      return x + (s_next - s) * 0.5 * (d + velocity_fn(x_euler, s_next))

    return jax.lax.cond(s_next > 0, corrected, lambda x_euler: x_euler, x_euler)

  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


def _dpmpp_2m(velocity_fn: VelocityFn, x: jax.Array, sigmas: jax.Array) -> jax.Array:
  # λ = log((1-σ)/σ): -∞ at σ = 1, +∞ at σ = 0; the infinities only reach weights that are masked or 0.
  lam = jnp.log1p(-sigmas) - jnp.log(sigmas)

  def body(i, carry):
    x, x0_prev = carry
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = x - s * velocity_fn(x, s)
    h = lam[i + 1] - lam[i]
    h_prev = lam[i] - lam[jnp.maximum(i - 1, 0)]
    second_order = (i > 0) & (s_next > 0)
    weight = jnp.where(second_order, h / (2.0 * h_prev), 0.0)
    d = x0 + weight * (x0 - x0_prev)
    x = (s_next / s) * (x - (1.0 - s) * d) + (1.0 - s_next) * d
    return x, x0

  x, _ = jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, jnp.zeros_like(x)))
  return x


def _euler_stochastic(velocity_fn: VelocityFn, x: jax.Array, sigmas: jax.Array, noise: NoiseFn) -> jax.Array:
  def body(i, x):
    s, s_next = sigmas[i], sigmas[i + 1]
    x0 = x - s * velocity_fn(x, s)
    return (1.0 - s_next) * x0 + s_next * noise(i).astype(x.dtype)

  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


_DRIVERS = {"euler": _euler, "heun": _heun, "dpmpp_2m": _dpmpp_2m, "euler_stochastic": _euler_stochastic}


def _noise_fn(key, x: jax.Array) -> NoiseFn:
  """`key` (one PRNG key, or one per example along x's leading axis, or already a NoiseFn) -> NoiseFn."""
  if callable(key):
    return key
  if key.ndim == 0:
    return lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
  if key.shape != x.shape[:1]:
    raise ValueError(f"key has shape {key.shape}: give one key, or one per example ({x.shape[0]},).")
  per_example = jax.vmap(
      lambda k, i: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype), in_axes=(0, None)
  )
  return lambda i: per_example(key, i)


def sample(
    velocity_fn: VelocityFn,
    x_init: jax.Array,
    sigmas: jax.Array,
    solver: str = "euler",
    key: Union[jax.Array, NoiseFn, None] = None,
) -> jax.Array:
  """Integrates dx/dσ = velocity_fn(x, σ) along `sigmas` and returns the final state (x0 when σ_n = 0).

  Jit with `solver` static, e.g. jax.jit(sample, static_argnames=("velocity_fn", "solver")) or inside a
  jitted pipeline; `sigmas` may be a traced array (its length fixes the number of steps).

  Args:
    velocity_fn: (x, σ scalar) -> rf velocity, same shape as x.
    x_init: starting point at σ_0 (pure noise ε when σ_0 = 1), any shape (B, ...).
    sigmas: (n+1,) decreasing noise levels, e.g. schedules.flow_sigmas(n, shift).
    solver: one of SOLVERS.
    key: the fresh noise of a STOCHASTIC solver: a PRNG key, a (B,) array of per-example keys (images then do
      not depend on batching), or a NoiseFn (e.g. to replay another library's noise). Ignored by ODE solvers.

  Returns:
    The state at σ_n, in x_init's dtype (integration runs in float32 or wider).

  Raises:
    ValueError: unknown solver, or a stochastic solver without a key.
  """
  if solver not in _DRIVERS:
    raise ValueError(f"Unknown solver {solver!r}; valid: {', '.join(SOLVERS)}.")
  if solver in STOCHASTIC and key is None:
    raise ValueError(f"solver {solver!r} draws fresh noise every step: pass key.")
  # Integrate in float32 even for bf16 inputs (diffusers' step() upcasts likewise).
  dtype = jnp.promote_types(x_init.dtype, jnp.float32)
  sigmas = jnp.asarray(sigmas, dtype)
  x = x_init.astype(dtype)
  if solver in STOCHASTIC:
    return _DRIVERS[solver](velocity_fn, x, sigmas, _noise_fn(key, x)).astype(x_init.dtype)
  return _DRIVERS[solver](velocity_fn, x, sigmas).astype(x_init.dtype)
