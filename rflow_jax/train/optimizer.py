"""The optax chain built from `config.optim`: clipping, AdamW with warmup, frozen and no-decay parameters."""

import jax
import optax

from rflow_jax.model import frontend


def param_labels(params):
  """'frozen' for the model's fixed tables, 'no_decay' for vectors (biases, norm scales), 'decay' for matrices."""

  def label(path, leaf):
    if frontend.is_frozen(path):
      return "frozen"
    return "decay" if leaf.ndim >= 2 else "no_decay"

  return jax.tree_util.tree_map_with_path(label, params)


def wsd_decay_start(num_steps: int, decay_fraction: float) -> int:
  """First step of the decay phase of a warmup-stable-decay run of `num_steps` (the last fraction decays)."""
  return num_steps - int(round(decay_fraction * num_steps))


def learning_rate_schedule(optim_config, num_steps: int):
  """Linear warmup to the peak, then constant, cosine decay to zero at `num_steps`, or warmup-stable-decay.

  "wsd" holds the peak until wsd_decay_start and then falls linearly to zero at `num_steps`. Up to the decay start
  the rate does not depend on `num_steps`, so a run of N steps and a longer run agree step for step until
  wsd_decay_start(N): a checkpoint of the longer run's stable phase at that step continues exactly as the N-step run
  (a decay branch: one long run gives several annealed compute points).
  """
  peak, warmup = optim_config.learning_rate, optim_config.warmup_steps
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if optim_config.decay == "constant":
    after = optax.constant_schedule(peak)
  elif optim_config.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1))
  elif optim_config.decay == "wsd":
    start = max(wsd_decay_start(num_steps, optim_config.decay_fraction), warmup)
    decay = optax.linear_schedule(peak, 0.0, max(num_steps - start, 1))
    after = optax.join_schedules([optax.constant_schedule(peak), decay], [start - warmup])
  else:
    raise ValueError(f"optim.decay={optim_config.decay!r}; valid: 'constant', 'cosine', 'wsd'")
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decay only on matrices); frozen tables get zero updates."""
  lr = learning_rate_schedule(optim_config, num_steps)

  def adamw(weight_decay):
    return optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps, weight_decay=weight_decay)

  tx = optax.multi_transform(
      {"decay": adamw(optim_config.weight_decay), "no_decay": adamw(0.0), "frozen": optax.set_to_zero()}, param_labels
  )
  if optim_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  return tx


def ema_decay(step, decay: float):
  """EMA decay with warmup, min(decay, (1+step)/(10+step)): early averages are not dominated by the random init."""
  return jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_average(ema, params, decay):
  """decay * ema + (1 - decay) * params, leaf by leaf (trees or single arrays); the native update's kernel
  (model/native/adamw_cpu.cc) computes the same expression."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
