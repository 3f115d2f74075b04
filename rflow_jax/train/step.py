"""The pure train step: (state, batch) -> (state, metrics), jitted once by the trainer.

Statics (model, text stack, formulation, optimiser, config numbers) are bound with functools.partial (by the flow
task, rflow_jax/train/tasks.py) so the jitted function's only arguments are arrays. Randomness is fold_in(seed key,
step): a resumed run draws exactly what an uninterrupted one would.

Gradient accumulation (train.microbatches = k > 1): the step draws the whole batch's randomness (caption dropout,
t, ε) and encodes its captions first, then scans the backbone's forward and backward over k microbatches, summing
float32 gradients, and makes one optimiser update. Microbatch j takes rows j, j + k, j + 2k, ... so that every
device holds its share of every microbatch (no resharding); the per-example losses are put back in batch order, so
the loss, the per-t-bin losses and the gradients are the single big step's up to float summation order.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rflow_jax.flow import losses
from rflow_jax.model import text_encoders, vae as vae_lib
from rflow_jax.train import optimizer as optim_lib
from rflow_jax.train.state import TrainState

NUM_T_BINS = 4  # Loss is also reported per quarter of t (minRF's lossbin, computed on device).
LATENT_NOISE_STREAM = 2  # Precomputed latents: the posterior sample's noise is fold_in(step key, this).


@dataclasses.dataclass(frozen=True)
class StoredInputs:
  """What the step needs to train on precomputed records (rflow_jax/train/latent_data.py builds it).

  Attributes:
    text_treedef: structure of the text stack's outputs; the batch holds its leaves under `text_keys`.
    text_keys: batch keys of the stored per-encoder outputs, in jax.tree.leaves order.
    scaling_factor, shift_factor: the VAE's latent normalisation (applied by vae.normalize_latents).
    empty: the stored empty prompt's outputs (batch 1, leaves order) for text.drop_to="empty"; None: zeros.
  """

  text_treedef: Any
  text_keys: tuple[str, ...]
  scaling_factor: float
  shift_factor: float
  empty: tuple | None = None


def condition(text_stack, text_params, tokens, key, drop_prob, empty_tokens=None):
  """Frozen text encoders -> per-encoder caption dropout (to zeros, or to the empty prompt's outputs when
  `empty_tokens` is given) -> SD3 composition (context, pooled)."""
  outputs = text_stack.apply({"params": text_params}, tokens)
  empty = None if empty_tokens is None else text_encoders.empty_outputs(text_stack, text_params, empty_tokens)
  context, pooled = text_encoders.drop_and_compose(outputs, key, drop_prob, empty)
  return jax.lax.stop_gradient(context), jax.lax.stop_gradient(pooled)


def stored_inputs(batch, key, stored: StoredInputs, drop_prob: float):
  """Precomputed records -> (x0, context, pooled), as encoding the images and captions inside the step would give.

  x0 = normalize_latents(mean + exp(logvar / 2)·ε) with fresh ε from the step's key; the stored per-encoder outputs
  go through the same caption dropout (the same key) and composition as `condition`'s.
  """
  k_drop, _ = jax.random.split(key)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  x = vae_lib.sample_posterior(
      f32(batch["latent_mean"]), f32(batch["latent_logvar"]), jax.random.fold_in(key, LATENT_NOISE_STREAM)
  )
  x0 = vae_lib.normalize_latents(x, stored.scaling_factor, stored.shift_factor)
  outputs = jax.tree.unflatten(stored.text_treedef, [f32(batch[k]) for k in stored.text_keys])
  empty = None if stored.empty is None else jax.tree.unflatten(stored.text_treedef, [f32(x) for x in stored.empty])
  context, pooled = text_encoders.drop_and_compose(outputs, k_drop, drop_prob, empty)
  return x0, jax.lax.stop_gradient(context), jax.lax.stop_gradient(pooled)


def _microbatch_loss(params, inputs, *, model, formulation, microbatches: int):
  """Loss of one microbatch scaled so that the k microbatches' losses (and gradients) sum to the batch mean."""
  model_fn = lambda z_t, model_time: model.apply(
      {"params": params}, z_t, model_time, inputs["context"], inputs["pooled"]
  )
  per_example = losses.loss_at(formulation, model_fn, inputs["image"], inputs["t"], inputs["eps"])  # (b,)
  return per_example.mean() / microbatches, per_example


def _split(x, k: int):
  """(B, ...) -> (k, B/k, ...) with microbatch j = rows j, j+k, ... (each device's rows split k ways, in place)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def _unsplit(x):
  """Inverse of _split: (k, B/k, ...) -> (B, ...) in batch order."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def _grads_and_metrics(
    params,
    text_params,
    batch,
    key,
    *,
    model,
    text_stack,
    formulation,
    drop_prob: float,
    microbatches: int,
    stored: StoredInputs | None = None,
    empty_tokens=None,
):
  """Mean loss of the batch, its per-example losses and times (B,), and the float32 gradient of the mean loss.

  The randomness is drawn for the whole batch before any split, so any `microbatches` sees the same draws.
  """
  k_drop, k_loss = jax.random.split(key)
  if stored is None:
    x0 = batch["image"]
    context, pooled = condition(text_stack, text_params, batch["tokens"], k_drop, drop_prob, empty_tokens)
  else:
    x0, context, pooled = stored_inputs(batch, key, stored, drop_prob)
  t, eps = losses.draw_noise(formulation, k_loss, x0.shape)
  inputs = {"image": x0, "context": context, "pooled": pooled, "t": t, "eps": eps}
  grad_fn = jax.value_and_grad(
      functools.partial(_microbatch_loss, model=model, formulation=formulation, microbatches=microbatches), has_aux=True
  )
  if microbatches == 1:
    (loss, per_example), grads = grad_fn(params, inputs)
    return loss, per_example, t, grads

  def body(acc, micro):
    (_, per_example), grads = grad_fn(params, micro)
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), per_example

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grads, per_example = jax.lax.scan(body, zeros, jax.tree.map(lambda x: _split(x, microbatches), inputs))
  per_example = _unsplit(per_example)
  return per_example.mean(), per_example, t, grads


def train_step(
    state: TrainState,
    batch,
    *,
    model,
    text_stack,
    formulation,
    tx,
    learning_rate,
    seed: int,
    drop_prob: float,
    ema_decay: float,
    microbatches: int = 1,
    stored: StoredInputs | None = None,
    empty_tokens=None,
    native_update=None,
) -> tuple[TrainState, dict[str, Any]]:
  """One optimiser update with EMA and a non-finite guard.

  Args:
    state: the current TrainState.
    batch: {"image": (B, H, W, C) float32 in [-1, 1], "tokens": (B, L) int32} (global arrays); with `stored`, the
      precomputed records' arrays instead (stored_inputs).
    model, text_stack: Linen modules. formulation: rflow_jax.flow.formulations.Formulation. tx: optax transform.
    learning_rate: tx's schedule, step -> rate (the guard checks it is finite).
    seed: root seed; the step's key is fold_in(key(seed), step).
    drop_prob: per-encoder caption dropout probability.
    ema_decay: EMA decay (warmed up, see optimizer.ema_decay).
    microbatches: gradient accumulation: the batch is processed in this many pieces (divides the per-device batch).
    stored: train on precomputed latent moments and text-stack outputs (data.name="precomputed"); None: images and
      tokens, encoded in the step.
    empty_tokens: the empty prompt's tokens: dropped encoders give its outputs (text.drop_to="empty"); None: zeros.
    native_update: optim.update_impl="native": native_update.update with the config bound; it makes tx's update and
      the EMA in one native pass, or returns None where it cannot run (then tx is used). None: tx.

  Returns:
    The new state and a dict of scalar metrics (on device).
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  loss, per_example, t, grads = _grads_and_metrics(
      state.params,
      state.text_params,
      batch,
      key,
      model=model,
      text_stack=text_stack,
      formulation=formulation,
      drop_prob=drop_prob,
      microbatches=microbatches,
      stored=stored,
      empty_tokens=empty_tokens,
  )
  grad_norm = optax.tree.norm(grads)
  # The guard is decided before the update, from three scalars, so that the update pass is one conditional branch
  # writing params, moments and EMA once. Selecting between new and old state after the update (jnp.where per
  # leaf) made XLA materialise both and cost as much as the update itself: the update alone of 73.6M params
  # (benchmarks/vs_diffusers.py's size), side by side on a busy 2-core machine, took 0.87 s that way and 0.40 s this
  # way (torch's clip + AdamW + EMA: 0.35 s). The three scalars cover the whole new state, given that the state
  # before the step is finite (the guard keeps it so): Adam's moments are averages of gradients and of their squares,
  # each square at most grad_norm² (an overflowing sum of squares makes grad_norm inf); its direction m̂/(√v̂ + ε) is
  # then finite and bounded, so the update, lr·(direction + weight_decay·params), is finite when the learning rate
  # is; the EMA averages finite params.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(learning_rate(state.step))

  def update():
    decay = optim_lib.ema_decay(state.step, ema_decay)
    if native_update is not None:
      new = native_update(grads, grad_norm, state.opt_state, state.params, state.ema_params, decay)
      if new is not None:
        return new
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim_lib.ema_average(state.ema_params, params, decay)
    return params, opt_state, ema, optax.tree.norm(updates)

  # A non-finite update is never applied: a checkpoint can then never hold NaNs. Whether the run goes on ("skip")
  # or stops ("halt") is the trainer's policy, decided when it fetches the metrics. A dropped step reports a NaN
  # update norm: no update was made.
  keep = lambda: (state.params, state.opt_state, state.ema_params, jnp.full((), jnp.nan, jnp.float32))
  params, opt_state, ema, update_norm = jax.lax.cond(finite, update, keep)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema,
      skipped_steps=state.skipped_steps + jnp.where(finite, 0, 1).astype(state.skipped_steps.dtype),
  )
  sums, counts = losses.binned_sums(per_example, t, NUM_T_BINS)
  binned = sums / jnp.maximum(counts, 1.0)  # Empty bins: 0 here, weight 0 in writers.average_metrics (dropped).
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(new_state.params),
      "update_norm": update_norm,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "skipped_steps": new_state.skipped_steps,
      **{f"loss_t{i}": binned[i] for i in range(NUM_T_BINS)},
      **{f"count_t{i}": counts[i] for i in range(NUM_T_BINS)},
  }
  return new_state, metrics
