"""Forward processes z_t = a_t x0 + b_t ε: the single home of rflow_jax's time and velocity convention.

Time convention (used everywhere: training, sampling, metrics, docs):
  * t ∈ [0, 1]; t = 0 is data, t = 1 is noise.
  * The rectified-flow (rf) path is z_t = (1 - t) x0 + t ε, ε ~ N(0, I). Its noise level is called σ, and for
    rf σ = t. Sampling schedules (rflow_jax/sampling) run σ from 1 down to 0.
  * The network of an rf model predicts the velocity v ≈ dz/dt = ε - x0 (not x0 - ε).
  * The network's time input is `Formulation.model_time(t)` ∈ [0, 1]; the network itself embeds
    1000 · model_time (rflow_jax/model/embeddings.py TIMESTEP_SCALE, diffusers' timestep = 1000 σ).
    For rf, model_time(t) = t.

Other forward processes (SD3 §3 / Kingma & Gao) share the same t direction and differ in (a_t, b_t):

  path             a_t                              b_t              endpoints
  rf               1 - t                            t                a_0=1, b_0=0, a_1=0, b_1=1
  cos              cos(πt/2)                        sin(πt/2)        same
  linear (LDM VP)  sqrt(ᾱ) interpolated at t(T-1)   sqrt(1 - a_t²)   a_0=sqrt(1-β_0)≈0.9996, a_1≈0.068
  edm              c_in(σ_t) = 1/sqrt(σ_t² + ρ²)    σ_t c_in(σ_t)    a_0=1/ρ=2, b_0=0, a_1=0, b_1=1

For EDM the stored state is the *preconditioned network input* c_in · (x0 + σ_t ε), i.e. the EDM variance-
exploding state scaled by c_in; so for every formulation the network input is z_t itself and no separate
input scaling exists. σ_t = exp(log σ_t) is set by the EDM schedule (normal, rf or cos; see EDMPath) and
ρ = EDM_SIGMA_DATA = 0.5 is the data scale of the paper's w^EDM.

Log-SNR λ_t = log(a_t² / b_t²) is invariant to a common scaling of (a_t, b_t).

Conversion between formulations ("any trained model can drive any sampler"):
  A state z = a x0 + b ε is, up to a scalar, a point on the rf path: x = z / (a + b) = (1-σ) x0 + σ ε with
  rf-equivalent noise level σ = b / (a + b) (equivalently λ = 2 log((1-σ)/σ), the same log-SNR). The rf
  velocity at (x, σ) is ε̂ - x̂0, where (x̂0, ε̂) is the model's prediction of (x0, ε) from z. Each path
  provides `rf_sigma(t)` and its inverse `t_from_rf_sigma(σ)`; Formulation.as_velocity_fn composes them.
  On the rf path itself: x̂0 = x - σ v, ε̂ = x + (1 - σ) v.

The LDM linear schedule constants β_0 = 0.00085, β_{T-1} = 0.012, T = 1000 are the LDM / Stable Diffusion
standard; they are not given in the SD3 paper (not verified from the paper).
"""

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

# EDM data scale ρ (σ_data); the paper's w^EDM uses (e^{-λ} + 0.5²).
EDM_SIGMA_DATA = 0.5

# LDM "scaled linear" β schedule (LDM standard; not verified from the SD3 paper).
LDM_BETA_START = 0.00085
LDM_BETA_END = 0.012
LDM_NUM_TIMESTEPS = 1000

# EDM log σ is clipped to ±this so that t ∈ {0, 1} (log σ = ∓∞) gives finite a_t, b_t (σ up to ~1e13).
_EDM_LOG_SIGMA_MAX = 30.0


def expand_t(t: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a scalar or (B,) time to broadcast over x's trailing dims: (B,) -> (B, 1, ..., 1)."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def rf_interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """z_t = (1 - t) x0 + t ε on the rf path; t scalar or (B,)."""
  t = expand_t(t, x0)
  return (1.0 - t) * x0 + t * eps


def rf_velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """The rf velocity dz_t/dt = ε - x0 (the sign convention of rflow_jax and diffusers)."""
  return eps - x0


def rf_x0_from_velocity(x: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
  """x̂0 = x - σ v for a point x at rf noise level σ."""
  return x - expand_t(sigma, x) * v


def rf_eps_from_velocity(x: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
  """ε̂ = x + (1 - σ) v for a point x at rf noise level σ."""
  return x + (1.0 - expand_t(sigma, x)) * v


def rf_log_snr(sigma: jax.Array) -> jax.Array:
  """λ = log((1 - σ)² / σ²) of the rf path at noise level σ (= t)."""
  return 2.0 * (jnp.log1p(-sigma) - jnp.log(sigma))


class Path(Protocol):
  """A forward process z_t = a_t x0 + b_t ε over t ∈ [0, 1]."""

  def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a_t, b_t), elementwise in t."""

  def rf_sigma(self, t: jax.Array) -> jax.Array:
    """rf-equivalent noise level σ = b_t / (a_t + b_t), increasing in t."""

  def t_from_rf_sigma(self, sigma: jax.Array) -> jax.Array:
    """Inverse of rf_sigma (clamped to the path's t range)."""


def log_snr(path: Path, t: jax.Array) -> jax.Array:
  """λ_t = log(a_t² / b_t²)."""
  a, b = path.coefficients(t)
  return 2.0 * (jnp.log(a) - jnp.log(b))


def d_log_snr(path: Path, t: jax.Array) -> jax.Array:
  """λ'_t = dλ/dt (negative: SNR falls as t goes to noise), by forward-mode autodiff of `log_snr`."""
  t = jnp.asarray(t)
  return jax.jvp(lambda s: log_snr(path, s), (t,), (jnp.ones_like(t),))[1]


def d_coefficients(path: Path, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(a'_t, b'_t) by forward-mode autodiff."""
  t = jnp.asarray(t)
  return jax.jvp(path.coefficients, (t,), (jnp.ones_like(t),))[1]


@dataclasses.dataclass(frozen=True)
class RFPath:
  """Rectified flow: a_t = 1 - t, b_t = t."""

  def coefficients(self, t):
    return 1.0 - t, t

  def rf_sigma(self, t):
    return t

  def t_from_rf_sigma(self, sigma):
    return sigma


@dataclasses.dataclass(frozen=True)
class CosinePath:
  """Cosine (VP): a_t = cos(πt/2), b_t = sin(πt/2)."""

  def coefficients(self, t):
    # cos(πt/2) written as sin(π(1-t)/2) so that a_1 is exactly 0 (cos(π/2) is -4e-8 in float32).
    return jnp.sin(0.5 * jnp.pi * (1.0 - t)), jnp.sin(0.5 * jnp.pi * t)

  def rf_sigma(self, t):
    a, b = self.coefficients(t)
    return b / (a + b)

  def t_from_rf_sigma(self, sigma):
    # tan(πt/2) = b/a = σ/(1-σ).
    return (2.0 / jnp.pi) * jnp.arctan2(sigma, 1.0 - sigma)


@functools.lru_cache(maxsize=None)
def ldm_alphas(beta_start: float, beta_end: float, num_timesteps: int) -> np.ndarray:
  """a_i = sqrt(ᾱ_i), i = 0..T-1, of the LDM schedule β_i = (sqrt β_0 + i/(T-1)(sqrt β_{T-1} - sqrt β_0))².

  Returns:
    float64 array (T,), strictly decreasing.
  """
  betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2
  return np.sqrt(np.cumprod(1.0 - betas))


@dataclasses.dataclass(frozen=True)
class LinearVPPath:
  """LDM "linear" VP schedule in continuous time: index i = t (T-1), a_t linearly interpolated, b = sqrt(1-a²)."""

  beta_start: float = LDM_BETA_START
  beta_end: float = LDM_BETA_END
  num_timesteps: int = LDM_NUM_TIMESTEPS

  def _table(self) -> np.ndarray:
    return ldm_alphas(self.beta_start, self.beta_end, self.num_timesteps).astype(np.float32)

  def coefficients(self, t):
    table = self._table()
    index = jnp.asarray(t) * (self.num_timesteps - 1)
    a = jnp.interp(index, jnp.arange(self.num_timesteps, dtype=index.dtype), table)
    return a, jnp.sqrt(1.0 - a**2)

  def rf_sigma(self, t):
    a, b = self.coefficients(t)
    return b / (a + b)

  def t_from_rf_sigma(self, sigma):
    # b/a = σ/(1-σ) with a² + b² = 1 gives a; a_t is piecewise linear in t, so interpolating the table back
    # is exact. σ beyond the table's range clamps to t ∈ {0, 1}.
    a = (1.0 - sigma) / jnp.sqrt((1.0 - sigma) ** 2 + sigma**2)
    table = self._table()
    index = jnp.interp(-a, -table, jnp.arange(self.num_timesteps, dtype=table.dtype))
    return index / (self.num_timesteps - 1)


EDM_SCHEDULES = ("normal", "rf", "cos")


@dataclasses.dataclass(frozen=True)
class EDMPath:
  """EDM in preconditioned form: z_t = c_in (x0 + σ_t ε), c_in = 1/sqrt(σ_t² + ρ²).

  Attributes:
    schedule: how log σ_t depends on t (t ~ U(0, 1) in training):
      "normal": log σ_t = P_m + P_s Φ⁻¹(t), i.e. λ_t ~ N(-2P_m, (2P_s)²) (the paper's edm(P_m, P_s));
      "rf": σ_t = t / (1 - t), the log-SNR schedule of rf (edm/rf);
      "cos": σ_t = tan(πt/2), the log-SNR schedule of cos (edm/cos).
    p_mean: P_m (used by "normal").
    p_std: P_s (used by "normal").
    sigma_data: ρ.
  """

  schedule: str = "normal"
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_data: float = EDM_SIGMA_DATA

  def __post_init__(self):
    if self.schedule not in EDM_SCHEDULES:
      raise ValueError(f"Unknown EDM schedule {self.schedule!r}; valid: {EDM_SCHEDULES}.")

  def log_sigma(self, t):
    """log σ_t of the underlying variance-exploding process, clipped to ±30."""
    t = jnp.asarray(t)
    if self.schedule == "normal":
      ls = self.p_mean + self.p_std * special.ndtri(t)
    elif self.schedule == "rf":
      ls = jnp.log(t) - jnp.log1p(-t)
    else:
      # log tan(πt/2) with cos(πt/2) = sin(π(1-t)/2), exact 0 at t=1 (float32 tan(π/2) is negative).
      ls = jnp.log(jnp.sin(0.5 * jnp.pi * t)) - jnp.log(jnp.sin(0.5 * jnp.pi * (1.0 - t)))
    return jnp.clip(ls, -_EDM_LOG_SIGMA_MAX, _EDM_LOG_SIGMA_MAX)

  def coefficients(self, t):
    ls = self.log_sigma(t)
    # log sqrt(σ² + ρ²) via logaddexp keeps large σ finite.
    log_norm = 0.5 * jnp.logaddexp(2.0 * ls, 2.0 * math.log(self.sigma_data))
    return jnp.exp(-log_norm), jnp.exp(ls - log_norm)

  def rf_sigma(self, t):
    return jax.nn.sigmoid(self.log_sigma(t))  # σ/(1+σ)

  def t_from_rf_sigma(self, sigma):
    ls = jnp.log(sigma) - jnp.log1p(-sigma)
    if self.schedule == "normal":
      return special.ndtr((ls - self.p_mean) / self.p_std)
    if self.schedule == "rf":
      return sigma
    return (2.0 / jnp.pi) * jnp.arctan2(sigma, 1.0 - sigma)
