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


def learning_rate_schedule(optim_config, num_steps: int):
  """Linear warmup to the peak, then constant or cosine decay to zero at `num_steps`."""
  warmup = optax.linear_schedule(0.0, optim_config.learning_rate, max(optim_config.warmup_steps, 1))
  if optim_config.decay == "constant":
    after = optax.constant_schedule(optim_config.learning_rate)
  elif optim_config.decay == "cosine":
    after = optax.cosine_decay_schedule(optim_config.learning_rate, max(num_steps - optim_config.warmup_steps, 1))
  else:
    raise ValueError(f"optim.decay={optim_config.decay!r}; valid: 'constant', 'cosine'")
  return optax.join_schedules([warmup, after], [optim_config.warmup_steps])


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decay only on matrices); frozen tables get zero updates."""
  lr = learning_rate_schedule(optim_config, num_steps)

  def adamw(weight_decay):
    return optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                       weight_decay=weight_decay)

  tx = optax.multi_transform(
      {"decay": adamw(optim_config.weight_decay), "no_decay": adamw(0.0), "frozen": optax.set_to_zero()},
      param_labels)
  if optim_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  return tx


def ema_decay(step, decay: float):
  """EMA decay with warmup, min(decay, (1+step)/(10+step)): early averages are not dominated by the random init."""
  return jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
