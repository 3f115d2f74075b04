"""The optimiser update in one native pass on CPU: clip + AdamW + EMA (optim.update_impl="native").

`optimizer.make_optimizer`'s chain (global-norm clipping, then AdamW with decay on matrices only, frozen tables) and
the EMA, as optax and the step compute them, but in a single pass over the state: the C++ handler
(model/native/adamw_cpu.cc, in the same library as the native attention kernel) reads each element's gradient,
param, moments and EMA once and writes the last four in place. XLA:CPU compiles the same update into about ten
elementwise kernels per parameter leaf; at 73.6M parameters that took ~0.4-0.5 s of a ~5 s step, the native pass
~0.1 s (docs/results/performance.md). The optimiser state keeps optax's structure (checkpoints are
interchangeable with update_impl="optax"); the results agree with optax's to float32 rounding, in optax's order:

  g  <- (g / |g|) * max_norm              when clipping fires (|g| >= max_norm > 0)
  mu <- (1 - b1) * g + b1 * mu;   nu <- (1 - b2) * g * g + b2 * nu;   count <- count + 1
  u  <- (mu / (1 - b1^count)) / (sqrt(nu / (1 - b2^count)) + eps) + weight_decay * param
  u  <- -lr(schedule count) * u;   param <- param + u;   ema <- d * ema + (1 - d) * param

Where it cannot run, `update` returns None after one warning naming why, and the step uses optax: the library is
absent, the backend is not CPU, there is more than one device (the call has no sharding rule), or a param is not
float32.
"""

from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from rflow_jax.model import native_attention
from rflow_jax.train import optimizer as optim_lib

TARGET = native_attention.TARGETS["adamw"]
_warned: set[str] = set()


def fallback_reason(params) -> str | None:
  """Why the native update cannot run on these params here, or None."""
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  if jax.device_count() != 1:
    return f"{jax.device_count()} devices: the native update has no sharding rule"
  dtypes = sorted({str(p.dtype) for p in jax.tree.leaves(params)} - {"float32"})
  if dtypes:
    return f"params of dtype {dtypes}, not float32"
  return native_attention.load()


def _split_state(opt_state):
  """(clip state or None, PartitionState) of make_optimizer's chain."""
  if isinstance(opt_state, tuple) and len(opt_state) == 2 and hasattr(opt_state[1], "inner_states"):
    return opt_state[0], opt_state[1]
  return None, opt_state


def _group(label, leaves, labels, adam, schedule, grads, ema, grad_norm, coefs_base, weight_decay, learning_rate):
  """One FFI call over the leaves of one label; returns ({leaf index: (param, ema)}, new adam, new schedule, sumsq)."""
  index = [i for i, name in enumerate(labels) if name == label]
  mu, nu = jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)
  if len(mu) != len(index) or len(nu) != len(index):
    raise ValueError(f"optimizer state's {label!r} moments do not match the params labelled {label!r}")
  count = numerics.safe_increment(adam.count)
  b1, b2 = coefs_base["b1"], coefs_base["b2"]
  coefs = jnp.stack(
      [
          jnp.asarray(x, jnp.float32)
          for x in (
              coefs_base["clip"],
              grad_norm,
              coefs_base["max_norm"],
              b1,
              1 - b1,
              b2,
              1 - b2,
              1 - b1**count,  # As optax's bias_correction computes them.
              1 - b2**count,
              coefs_base["eps"],
              weight_decay,
              -learning_rate(schedule.count),
              coefs_base["ema_decay"],
              1.0 - coefs_base["ema_decay"],
          )
      ]
  )
  operands = [coefs]
  for j, i in enumerate(index):
    operands += [leaves[i], mu[j], nu[j], ema[i], grads[i]]
  shapes = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in operands[1:]]
  out_types = [s for k, s in enumerate(shapes) if k % 5 != 4] + [jax.ShapeDtypeStruct((1,), jnp.float32)]
  aliases = {1 + 5 * j + k: 4 * j + k for j in range(len(index)) for k in range(4)}
  out = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases=aliases)(*operands)
  new = {i: (out[4 * j], out[4 * j + 3]) for j, i in enumerate(index)}
  unflatten = lambda tree, xs: jax.tree.unflatten(jax.tree.structure(tree), xs)
  new_mu = unflatten(adam.mu, [out[4 * j + 1] for j in range(len(index))])
  new_nu = unflatten(adam.nu, [out[4 * j + 2] for j in range(len(index))])
  new_schedule = schedule._replace(count=numerics.safe_increment(schedule.count))
  return new, adam._replace(count=count, mu=new_mu, nu=new_nu), new_schedule, out[-1][0]


def update(grads, grad_norm, opt_state, params, ema_params, ema_decay, *, optim_config, learning_rate) -> Any:
  """(params, opt_state, ema_params, update_norm) after one step, as optax + the EMA give; None where it cannot run.

  Args:
    grads: float32 gradients (the params' tree). grad_norm: their global norm (optax.tree.norm).
    opt_state: make_optimizer(optim_config)'s state. params, ema_params: the current params and EMA.
    ema_decay: this step's EMA decay (optimizer.ema_decay). optim_config: config.optim.
    learning_rate: the schedule, count -> rate (optimizer.learning_rate_schedule).
  """
  reason = fallback_reason(params)
  if reason is not None:
    if reason not in _warned:
      _warned.add(reason)
      logging.warning("optim.update_impl=native falls back to optax: %s", reason)
    return None
  clip_state, partition = _split_state(opt_state)
  max_norm = optim_config.grad_clip_norm
  base = {
      "clip": (max_norm > 0) & (grad_norm >= max_norm),  # optax.clip_by_global_norm's trigger, negated.
      "max_norm": max_norm if max_norm > 0 else 1.0,
      "b1": optim_config.b1,
      "b2": optim_config.b2,
      "eps": optim_config.eps,
      "ema_decay": ema_decay,
  }
  leaves, treedef = jax.tree.flatten(params)
  labels = jax.tree.leaves(optim_lib.param_labels(params))
  g_leaves, e_leaves = treedef.flatten_up_to(grads), treedef.flatten_up_to(ema_params)
  new_params, new_ema = list(leaves), list(e_leaves)
  inner, sumsq = dict(partition.inner_states), jnp.zeros((), jnp.float32)
  for label, weight_decay in (("decay", optim_config.weight_decay), ("no_decay", 0.0)):
    if label not in labels:
      continue
    adam, decay_state, schedule = inner[label].inner_state
    new, adam, schedule, s = _group(
        label, leaves, labels, adam, schedule, g_leaves, e_leaves, grad_norm, base, weight_decay, learning_rate
    )
    for i, (p, e) in new.items():
      new_params[i], new_ema[i] = p, e
    inner[label] = inner[label]._replace(inner_state=(adam, decay_state, schedule))
    sumsq = sumsq + s
  for i, label in enumerate(labels):  # Frozen tables: no update; their EMA still averages them.
    if label == "frozen":
      new_ema[i] = optim_lib.ema_average(e_leaves[i], leaves[i], ema_decay)
  partition = partition._replace(inner_states=inner)
  new_state = partition if clip_state is None else (clip_state, partition)
  return treedef.unflatten(new_params), new_state, treedef.unflatten(new_ema), jnp.sqrt(sumsq)
