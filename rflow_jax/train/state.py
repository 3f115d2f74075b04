"""The training state: everything a resumed run needs, and nothing that lives only in memory."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Checkpointed training state.

  Attributes:
    step: number of optimiser updates applied (int32 scalar); also the index the per-step RNG is folded with.
    params: MM-DiT parameters (float32).
    opt_state: optax state, shaped and sharded like `params` where it mirrors them.
    ema_params: exponential moving average of `params`, used for sampling by default.
    text_params: the frozen text encoders' weights (never updated; stored so samplers need no side input).
    skipped_steps: count of updates dropped by the non-finite guard.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  text_params: Any
  skipped_steps: jax.Array
