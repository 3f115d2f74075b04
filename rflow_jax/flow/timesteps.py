"""Training-time samplers t ~ π(t) and the resolution-dependent timestep shift.

Times follow rflow_jax/flow/paths.py: t ∈ (0, 1), t=0 data, t=1 noise. A sampler is named by a short string
(the paper's notation, SD3 §3.1):

  "uniform"        t ~ U(0, 1)
  "lognorm(m,s)"   logit-normal: t = sigmoid(u), u ~ N(m, s²); m>0 biases towards noise, m<0 towards data
  "mode(s)"        mode sampling with heavy tails: t = f_mode(u; s), u ~ U(0, 1); s ∈ [-1, 2/(π-2)]
  "cosmap"         t = 1 - 1/(tan(πu/2) + 1), u ~ U(0, 1)

Sampling t from π is equivalent to weighting the uniform-t loss by π(t) (SD3 §3.1), so a formulation's
density enters training only through `sample`. `density` and `cdf` exist for tests, plots and docs.

The resolution shift t ↦ α t / (1 + (α-1) t) (SD3 §5.3.2) moves log-SNR by -2 log α; α = sqrt(m/n) maps a
schedule tuned for n pixels to m pixels. It is used identically for training times and sampling sigmas.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.scipy import special

# Sampled times are clipped into [T_EPS, 1 - T_EPS] so that downstream log-SNR, logit and inverse-CDF
# maps stay finite; the clipped mass (< 2e-5) is far below what any loss or KS test can resolve.
T_EPS = 1e-5

# f_mode(u; s) is monotone on [0, 1] only for s in this range (SD3 §3.1).
MODE_SCALE_MIN = -1.0
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)

VALID_NAMES = ("uniform", "lognorm(m,s)", "mode(s)", "cosmap")

_NUM = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_LOGNORM_RE = re.compile(r"lognorm\(" + _NUM + "," + _NUM + r"\)")
_MODE_RE = re.compile(r"mode\(" + _NUM + r"\)")


def format_number(x: float) -> str:
  """Paper-style 2-decimal number, falling back to repr when 2 decimals would lose precision."""
  short = f"{x:.2f}"
  return short if float(short) == x else repr(float(x))


@functools.lru_cache(maxsize=None)
def parse(name: str) -> tuple[str, tuple[float, ...]]:
  """Parses a sampler name into (kind, params), validating the parameters.

  Args:
    name: one of VALID_NAMES with numbers filled in, e.g. "lognorm(0.00, 1.00)" or "mode(1.29)". Spaces and
      number formats ("1", "1.0", "1e0") are tolerated; case is ignored.

  Returns:
    ("uniform", ()), ("lognorm", (m, s)), ("mode", (s,)) or ("cosmap", ()).

  Raises:
    ValueError: unknown name, a non-positive lognorm scale, or a mode scale outside [-1, 2/(π-2)].
  """
  key = name.strip().lower().replace(" ", "")
  if key == "uniform":
    return "uniform", ()
  if key == "cosmap":
    return "cosmap", ()
  if m := _LOGNORM_RE.fullmatch(key):
    loc, scale = float(m.group(1)), float(m.group(2))
    if not scale > 0:
      raise ValueError(f"lognorm scale must be > 0, got {scale} in {name!r}.")
    return "lognorm", (loc, scale)
  if m := _MODE_RE.fullmatch(key):
    s = float(m.group(1))
    if not MODE_SCALE_MIN <= s <= MODE_SCALE_MAX:
      raise ValueError(
          f"mode scale s={s} in {name!r} is outside [{MODE_SCALE_MIN}, {MODE_SCALE_MAX:.4f}] = [-1, 2/(π-2)], "
          "where f_mode stops being monotone."
      )
    return "mode", (s,)
  raise ValueError(f"Unknown timestep sampler {name!r}; valid forms: {', '.join(VALID_NAMES)}.")


def canonical(name: str) -> str:
  """Canonical spelling of a sampler name, e.g. "lognorm(0,1)" -> "lognorm(0.00,1.00)"."""
  kind, params = parse(name)
  return f"{kind}({','.join(format_number(p) for p in params)})" if params else kind


def mode_map(u: jax.Array, s: float) -> jax.Array:
  """f_mode(u; s) = 1 - u - s (cos²(πu/2) - 1 + u); decreasing from 1 at u=0 to 0 at u=1."""
  return 1.0 - u - s * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


@functools.partial(jax.jit, static_argnames="iterations")
def mode_map_inverse(t: jax.Array, s: float, iterations: int = 40) -> jax.Array:
  """Solves f_mode(u; s) = t for u by bisection (f_mode is monotone for valid s; no closed form).

  Args:
    t: times in [0, 1].
    s: mode scale in [-1, 2/(π-2)].
    iterations: bisection steps; 40 halve the bracket below float64 resolution of [0, 1].

  Returns:
    u with the shape and dtype of t.
  """
  t = jnp.asarray(t)
  lo, hi = jnp.zeros_like(t), jnp.ones_like(t)

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    # f_mode is decreasing: f(mid) > t means the root lies above mid.
    above = mode_map(mid, s) > t
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
  return 0.5 * (lo + hi)


def _cosmap(u: jax.Array) -> jax.Array:
  # 1 - 1/(tan(πu/2)+1) rewritten as sin/(sin+cos) so that u -> 1 does not overflow tan.
  s, c = jnp.sin(0.5 * jnp.pi * u), jnp.cos(0.5 * jnp.pi * u)
  return s / (s + c)


def sample(name: str, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Draws training times t ~ π_name, clipped into [T_EPS, 1 - T_EPS].

  Args:
    name: sampler name, see VALID_NAMES.
    key: PRNG key.
    shape: output shape, usually (batch,).
    dtype: floating dtype of the result.

  Returns:
    Array of times of the given shape and dtype.
  """
  kind, params = parse(name)
  if kind == "lognorm":
    loc, scale = params
    t = jax.nn.sigmoid(loc + scale * jax.random.normal(key, shape, dtype))
  else:
    u = jax.random.uniform(key, shape, dtype)
    if kind == "uniform":
      t = u
    elif kind == "mode":
      t = mode_map(u, params[0])
    else:  # cosmap
      t = _cosmap(u)
  return jnp.clip(t, T_EPS, 1.0 - T_EPS)


def cdf(name: str, t: jax.Array) -> jax.Array:
  """Cumulative distribution P(T ≤ t) of the sampler `name` (before the T_EPS clip)."""
  kind, params = parse(name)
  t = jnp.asarray(t)
  if kind == "uniform":
    return jnp.clip(t, 0.0, 1.0)
  if kind == "lognorm":
    loc, scale = params
    return special.ndtr((special.logit(t) - loc) / scale)
  if kind == "mode":
    # t = f(u) with f decreasing, so P(T ≤ t) = P(U ≥ f⁻¹(t)) = 1 - f⁻¹(t).
    return 1.0 - mode_map_inverse(t, params[0])
  # cosmap: u = (2/π) atan(t / (1 - t)).
  return (2.0 / jnp.pi) * jnp.arctan2(t, 1.0 - t)


def density(name: str, t: jax.Array) -> jax.Array:
  """Probability density π_name(t) on (0, 1), the formulas of SD3 §3.1.

  Args:
    name: sampler name, see VALID_NAMES.
    t: times in (0, 1).

  Returns:
    π(t), same shape as t.
  """
  kind, params = parse(name)
  t = jnp.asarray(t)
  if kind == "uniform":
    return jnp.ones_like(t)
  if kind == "lognorm":
    loc, scale = params
    z = (special.logit(t) - loc) / scale
    return jnp.exp(-0.5 * z**2) / (scale * math.sqrt(2 * math.pi) * t * (1.0 - t))
  if kind == "mode":
    # π_mode(t) = |d f⁻¹/dt| = 1 / |f'(f⁻¹(t))|, f'(u) = -1 - s + (sπ/2) sin(πu).
    s = params[0]
    u = mode_map_inverse(t, s)
    return 1.0 / jnp.abs(-1.0 - s + 0.5 * s * jnp.pi * jnp.sin(jnp.pi * u))
  return 2.0 / (jnp.pi * (1.0 - 2.0 * t + 2.0 * t**2))  # cosmap


def shift(t: jax.Array, alpha: float) -> jax.Array:
  """Resolution shift t ↦ α t / (1 + (α - 1) t) (SD3 §5.3.2); α > 1 moves times towards noise.

  Equivalent to λ ↦ λ - 2 log α on the rf log-SNR λ = 2 log((1-t)/t). Maps [0,1] onto itself with fixed
  endpoints; α = 1 is the identity.
  """
  return alpha * t / (1.0 + (alpha - 1.0) * t)


def unshift(t: jax.Array, alpha: float) -> jax.Array:
  """Inverse of `shift`: t ↦ t / (α - (α - 1) t), i.e. shift with 1/α."""
  return t / (alpha - (alpha - 1.0) * t)


def shift_density(name: str, t: jax.Array, alpha: float) -> jax.Array:
  """Density of shift(T, α) for T ~ π_name: π(unshift(t)) · d unshift/dt."""
  return density(name, unshift(t, alpha)) * alpha / (alpha - (alpha - 1.0) * t) ** 2


def resolution_shift(num_pixels: float, base_num_pixels: float) -> float:
  """α = sqrt(m/n) that carries a schedule tuned at n = base_num_pixels to m = num_pixels (SD3 §5.3.2).

  The paper reports α = 3.0 at 1024² as preferred (tuned by human preference, not by this formula).
  """
  return math.sqrt(num_pixels / base_num_pixels)
