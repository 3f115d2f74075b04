"""Inference noise-level grids σ_0 = 1 > σ_1 > ... > σ_n = 0 on the rf path (t=1 noise, t=0 data).

Styles:
  "shifted_linear": σ_i = shift(1 - i/n, α), the clean form of the SD3 resolution shift (§5.3.2).
  "diffusers":      exactly FlowMatchEulerDiscreteScheduler(shift=α).set_timesteps(n).sigmas (diffusers 0.42,
                    no dynamic shifting). The scheduler shifts its 1000 training sigmas at construction and
                    shifts the linspace between the shifted extremes again in set_timesteps, so the low end
                    is double-shifted and σ_{n-1} = shift(shift(0.001)) rather than a clean grid (diffusers 0.42; the
                    sd3.5 reference get_sigmas does the same). Use it to reproduce diffusers / sd3.5 samples.
The network's timestep for σ is 1000·σ (diffusers' `timesteps`), applied inside the model.
"""

import numpy as np

from rflow_jax.flow import timesteps

STYLES = ("shifted_linear", "diffusers")

# FlowMatchEulerDiscreteScheduler's num_train_timesteps in every SD3 scheduler_config.
DIFFUSERS_NUM_TRAIN_TIMESTEPS = 1000


def _diffusers_sigmas(num_steps: int, shift: float, num_train: int) -> np.ndarray:
  # __init__: float32 arithmetic (torch float32 tensors in diffusers; same IEEE operations here).
  train = np.linspace(1, num_train, num_train, dtype=np.float32)[::-1] / np.float32(num_train)
  train = shift * train / (1 + (shift - 1) * train)
  sigma_max, sigma_min = float(train[0]), float(train[-1])
  # set_timesteps: float64 numpy, shifted again, then cast to float32 and a final 0 appended.
  sigmas = np.linspace(sigma_max * num_train, sigma_min * num_train, num_steps) / num_train
  sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
  return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def flow_sigmas(num_steps: int, shift: float = 1.0, style: str = "shifted_linear") -> np.ndarray:
  """Noise levels for `num_steps` solver steps.

  Args:
    num_steps: number of solver steps n ≥ 1.
    shift: resolution shift α > 0 (SD3: 3.0 at 1024²).
    style: one of STYLES.

  Returns:
    float32 array (n+1,), decreasing, first value 1 ("diffusers": 1 up to float32), last value exactly 0.

  Raises:
    ValueError: bad num_steps, shift or style.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if not shift > 0:
    raise ValueError(f"shift must be > 0, got {shift}.")
  if style == "shifted_linear":
    return timesteps.shift(np.linspace(1.0, 0.0, num_steps + 1), shift).astype(np.float32)
  if style == "diffusers":
    return _diffusers_sigmas(num_steps, shift, DIFFUSERS_NUM_TRAIN_TIMESTEPS)
  raise ValueError(f"Unknown sigma schedule style {style!r}; valid: {', '.join(STYLES)}.")
