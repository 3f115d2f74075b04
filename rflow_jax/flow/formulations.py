"""The training formulations compared in SD3 §3 / §5.1, as one hashable `Formulation` per paper name.

A formulation is (forward path, network output, timestep sampler, loss weighting). `get(name)` parses the
paper's names:

  "rf", "rf/uniform"       rf path, velocity output, t ~ U(0, 1)
  "rf/lognorm(m,s)"        rf, velocity, logit-normal t (the SD3 default is rf/lognorm(0.00,1.00))
  "rf/mode(s)"             rf, velocity, mode sampling with heavy tails
  "rf/cosmap"              rf, velocity, CosMap sampling
  "eps/linear", "v/linear" LDM linear VP path, ε- resp. v-prediction, t ~ U(0, 1)
  "eps/cos", "v/cos"       cosine VP path, ε- resp. v-prediction
  "edm(P_m,P_s)"           EDM: F-prediction with EDM preconditioning, log σ ~ N(P_m, P_s²)
  "edm/rf", "edm/cos"      EDM preconditioning and weighting on the log-SNR schedule of rf resp. cos

The loss of every formulation is the per-example Monte-Carlo estimate of the unified objective
  L_w = -½ E_{t~U(0,1), ε} [ w_t λ'_t ||ε̂ - ε||² ]   (SD3 eq. for L_w; λ_t = log a_t²/b_t²)
under the formulation's own t-sampler π: loss(t) = -½ w_t λ'_t ||ε̂ - ε||² / π(t), evaluated in the
network's output space where it is numerically stable (see _LOSS_SCALES). The weights w_t are those of
the paper's weighted loss L_w (arXiv 2403.03206 §2; `Formulation.weight`); tests check the identity numerically for every formulation.

Times, paths and the rf-equivalence used by `to_velocity` are defined in rflow_jax/flow/paths.py.
"""

import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp

from rflow_jax.flow import paths
from rflow_jax.flow import timesteps

VALID_FORMS = (
    "rf",
    "rf/uniform",
    "rf/lognorm(m,s)",
    "rf/mode(s)",
    "rf/cosmap",
    "eps/linear",
    "v/linear",
    "eps/cos",
    "v/cos",
    "edm(P_m,P_s)",
    "edm/rf",
    "edm/cos",
)

# The formulations of the paper's Table 1, best average rank first (for sweeps and docs).
PAPER_TABLE1 = (
    "rf/lognorm(0.00,1.00)",
    "rf/lognorm(1.00,0.60)",
    "rf/lognorm(0.50,0.60)",
    "rf/mode(1.29)",
    "rf/lognorm(0.50,1.00)",
    "eps/linear",
    "rf/mode(1.75)",
    "rf/cosmap",
    "edm(0.00,0.60)",
    "rf",
    "v/linear",
    "edm(0.60,1.20)",
    "v/cos",
    "edm/cos",
    "edm/rf",
    "edm(-1.20,1.20)",
)

# Network outputs.
VELOCITY = "velocity"  # rf velocity ε - x0
EPS = "eps"  # ε
V = "v"  # v = a ε - b x0 (Salimans & Ho; VP paths)
F = "F"  # EDM F: D(z) = c_skip z_ve + c_out F

# ε-prediction is singular at a_t = 0 (pure noise, x̂0 = (z - b ε̂)/a); `as_velocity_fn` evaluates an
# ε-model at t ≤ this instead, which only perturbs a first sampling step that starts at σ = 1.
EPS_T_MAX = 0.999

# Per-example loss = scale · mean((net_out - target)²). With ε̂ - ε = k_t (net_out - target), the scale
# equals -½ w_t λ'_t k_t² / π(t) for the w_t of the paper's L_w (§2); it is a constant for every formulation:
#   rf:         w = t/(1-t)·π(t), λ' = -2/(t(1-t)), k = 1-t          -> 1 (the paper's L_CFM, plain v-MSE)
#   eps/linear: w = -2/λ' (standard ε-MSE)                          -> 1
#   v/linear:   w = -2(1+e^{-λ})/λ' (standard v-MSE), k = a          -> 1
#   eps/cos:    w = sech(λ/2), λ' = -2π/sin(πt)                      -> π
#   v/cos:      w = e^{-λ/2}, k = a                                  -> π/2
#   edm*:       w = p(λ_t)(e^{-λ}+ρ²), p = density of λ_t, k = -ρa   -> ρ²/2
_LOSS_SCALES = {
    ("rf", VELOCITY): 1.0,
    ("linear", EPS): 1.0,
    ("linear", V): 1.0,
    ("cos", EPS): math.pi,
    ("cos", V): math.pi / 2,
    ("edm", F): None,  # ρ²/2 with the path's ρ, see Formulation.loss
}

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)"
_EDM_RE = re.compile(r"edm\(" + _NUM + "," + _NUM + r"\)")


def _path_kind(path: paths.Path) -> str:
  if isinstance(path, paths.RFPath):
    return "rf"
  if isinstance(path, paths.CosinePath):
    return "cos"
  if isinstance(path, paths.LinearVPPath):
    return "linear"
  return "edm"


def _mean_sq(x: jax.Array) -> jax.Array:
  """Mean of x² over all non-batch dims -> (B,), in float32."""
  x = x.astype(jnp.float32)
  return jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True)
class Formulation:
  """One training formulation; frozen and hashable, so it can be a static jit argument.

  Attributes:
    name: canonical paper name, e.g. "rf/lognorm(0.00,1.00)".
    shift: resolution shift α applied to sampled times in rf-equivalent σ (1.0 = none).
    path: the forward process (rflow_jax.flow.paths).
    output: what the network predicts: "velocity", "eps", "v" or "F".
    sampler: training-time sampler name (rflow_jax.flow.timesteps), before the shift.
  """

  name: str
  shift: float = 1.0
  path: paths.Path = paths.RFPath()
  output: str = VELOCITY
  sampler: str = "uniform"

  @property
  def is_rf(self) -> bool:
    return isinstance(self.path, paths.RFPath)

  def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a_t, b_t) of z_t = a_t x0 + b_t ε."""
    return self.path.coefficients(jnp.asarray(t, jnp.float32))

  def sample_t(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Training times t ∈ (0, 1) from the formulation's sampler, with the resolution shift applied.

    The shift acts on the rf-equivalent noise level σ(t) (λ ↦ λ - 2 log α), which for rf is t itself.
    """
    t = timesteps.sample(self.sampler, key, shape)
    if self.shift != 1.0:
      t = self.path.t_from_rf_sigma(timesteps.shift(self.path.rf_sigma(t), self.shift))
    return t

  def noise(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = a_t x0 + b_t ε; t scalar or (B,). This is the network input for every formulation."""
    a, b = self.coefficients(t)
    return paths.expand_t(a, x0) * x0 + paths.expand_t(b, eps) * eps

  def model_time(self, t: jax.Array) -> jax.Array:
    """The network's time input in [0, 1] (the network embeds 1000·model_time).

    rf, linear and cos use t (for linear, 1000 t is the familiar DDPM index). EDM's c_noise = ¼ log σ is
    unbounded; we use sigmoid(log σ) = σ/(1+σ), the rf-equivalent σ, which is monotone in log σ, bounded,
    and independent of (P_m, P_s), so EDM variants share one time embedding.
    """
    t = jnp.asarray(t, jnp.float32)
    return self.path.rf_sigma(t) if self.output == F else t

  def target(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The network's regression target for this formulation."""
    if self.output == VELOCITY:
      return paths.rf_velocity_target(x0, eps)
    if self.output == EPS:
      return eps
    a, b = (paths.expand_t(c, x0) for c in self.coefficients(t))
    if self.output == V:
      return a * eps - b * x0
    rho = self.path.sigma_data  # F = (x0 - c_skip z_ve)/c_out = b x0/ρ - ρ a ε
    return b * x0 / rho - rho * a * eps

  def predict(self, net_out: jax.Array, z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x̂0, ε̂) implied by the network output at state z_t.

    Args:
      net_out: network output, shape of z.
      z: state z_t = a_t x0 + b_t ε (the network input).
      t: formulation time, scalar or (B,).

    Returns:
      (x0_hat, eps_hat), each the shape of z.
    """
    a, b = (paths.expand_t(c, z) for c in self.coefficients(t))
    if self.output == VELOCITY:  # rf: a + b = 1
      return z - b * net_out, z + a * net_out
    if self.output == EPS:
      return (z - b * net_out) / a, net_out
    if self.output == V:  # VP: a² + b² = 1
      return a * z - b * net_out, b * z + a * net_out
    # EDM: x̂0 = c_skip z_ve + c_out F with z_ve = z/a, c_skip = ρ²a², c_out = ρ b; ε̂ = (z_ve - x̂0)/σ.
    # Written in (a, b) these stay finite at σ = 0 and σ = ∞.
    rho = self.path.sigma_data
    return rho * (rho * a * z + b * net_out), b * z - rho * a * net_out

  def to_velocity(self, net_out: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """rf-equivalent velocity ε̂ - x̂0 at the rf point z/(a_t+b_t), σ = b_t/(a_t+b_t) (see paths.py)."""
    if self.output == VELOCITY:
      return net_out
    x0_hat, eps_hat = self.predict(net_out, z, t)
    return eps_hat - x0_hat

  def loss(self, net_out: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array, z_t: jax.Array) -> jax.Array:
    """Per-example weighted loss -½ w_t λ'_t ||ε̂ - ε||² / π(t), mean over non-batch dims.

    Args:
      net_out: network output at (z_t, model_time(t)).
      x0: clean data.
      eps: the noise used to make z_t.
      t: times from `sample_t`, (B,).
      z_t: noise(x0, eps, t); unused (every target here is a function of x0, ε, t) but part of the
        signature so the trainer need not know which formulations need it.

    Returns:
      (B,) float32 losses. For rf formulations this is the plain velocity MSE ||v - (ε - x0)||².
    """
    del z_t
    scale = _LOSS_SCALES[(_path_kind(self.path), self.output)]
    if scale is None:
      scale = 0.5 * self.path.sigma_data**2
    return scale * _mean_sq(net_out - self.target(x0, eps, t))

  def weight(self, t: jax.Array) -> jax.Array:
    """w_t of L_w (arXiv 2403.03206 §2) for this formulation at shift 1 (the shift changes the sampling density)."""
    t = jnp.asarray(t, jnp.float32)
    lam = paths.log_snr(self.path, t)
    dlam = paths.d_log_snr(self.path, t)
    kind = _path_kind(self.path)
    if kind == "rf":
      return t / (1.0 - t) * timesteps.density(self.sampler, t)
    if kind == "linear":
      return -2.0 / dlam if self.output == EPS else -2.0 * (1.0 + jnp.exp(-lam)) / dlam
    if kind == "cos":
      return 1.0 / jnp.cosh(0.5 * lam) if self.output == EPS else jnp.exp(-0.5 * lam)
    rho2 = self.path.sigma_data**2
    if self.path.schedule == "normal":
      loc, scale = -2.0 * self.path.p_mean, 2.0 * self.path.p_std
      normal = jnp.exp(-0.5 * ((lam - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
      return normal * (jnp.exp(-lam) + rho2)
    # edm/rf, edm/cos: the density of λ_t under t ~ U(0, 1), 1/|λ'_t|, replaces EDM's normal.
    return (jnp.exp(-lam) + rho2) / jnp.abs(dlam)

  def sample_density(self, t: jax.Array) -> jax.Array:
    """Density π(t) of `sample_t` at shift 1."""
    return timesteps.density(self.sampler, t)

  def as_velocity_fn(
      self, model_fn: Callable[[jax.Array, jax.Array], jax.Array]
  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wraps a trained network as an rf velocity field, so any formulation drives the rf samplers.

    Args:
      model_fn: (z, model_time (B,)) -> network output, conditioning closed over.

    Returns:
      velocity_fn(x, sigma) -> dx/dσ on the rf path; sigma scalar or (B,).
    """

    def velocity_fn(x, sigma):
      sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
      if self.output == VELOCITY:
        return model_fn(x, sigma)
      t = self.path.t_from_rf_sigma(sigma)
      if self.output == EPS:
        t = jnp.minimum(t, EPS_T_MAX)
      a, b = self.coefficients(t)
      z = paths.expand_t(a + b, x) * x  # the formulation's state at the same rf point
      return self.to_velocity(model_fn(z, self.model_time(t)), z, t)

    return velocity_fn


def get(name: str, *, shift: float = 1.0) -> Formulation:
  """Builds the formulation named in the paper's notation.

  Args:
    name: e.g. "rf", "rf/lognorm(0.00, 1.00)", "rf/mode(1.29)", "rf/cosmap", "eps/linear", "v/cos",
      "edm(0.00,0.60)", "edm/rf". Case, spaces and number formats ("0", "0.0", "1e-1") are tolerated.
    shift: resolution shift α > 0 for training times (SD3 uses 3.0 at 1024²).

  Returns:
    The Formulation, with a canonical name (e.g. "rf/lognorm(0.00,1.00)").

  Raises:
    ValueError: unknown name (the message lists VALID_FORMS), bad parameters, or shift ≤ 0.
  """
  if not shift > 0:
    raise ValueError(f"shift must be > 0, got {shift}.")
  key = name.strip().lower().replace(" ", "")
  shift = float(shift)
  fixed = {
      "eps/linear": (paths.LinearVPPath(), EPS),
      "v/linear": (paths.LinearVPPath(), V),
      "eps/cos": (paths.CosinePath(), EPS),
      "v/cos": (paths.CosinePath(), V),
      "edm/rf": (paths.EDMPath(schedule="rf"), F),
      "edm/cos": (paths.EDMPath(schedule="cos"), F),
  }
  if key in fixed:
    path, output = fixed[key]
    return Formulation(name=key, shift=shift, path=path, output=output)
  if key == "rf" or key.startswith("rf/"):
    try:
      sampler = timesteps.canonical(key[3:] or "uniform")
    except ValueError as e:
      raise ValueError(f"Bad formulation {name!r}: {e} Valid forms: {', '.join(VALID_FORMS)}.") from e
    canonical = "rf" if sampler == "uniform" else f"rf/{sampler}"
    return Formulation(name=canonical, shift=shift, sampler=sampler)
  if m := _EDM_RE.fullmatch(key):
    p_mean, p_std = float(m.group(1)), float(m.group(2))
    if not p_std > 0:
      raise ValueError(f"EDM P_s must be > 0, got {p_std} in {name!r}.")
    canonical = f"edm({timesteps.format_number(p_mean)},{timesteps.format_number(p_std)})"
    return Formulation(name=canonical, shift=shift, path=paths.EDMPath("normal", p_mean, p_std), output=F)
  raise ValueError(f"Unknown formulation {name!r}; valid forms: {', '.join(VALID_FORMS)}.")
