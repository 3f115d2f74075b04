"""The validation-loss protocol of the scaling study (SD3 §5.3): held-out loss at 8 fixed noise levels.

Training losses are noisy (random t, random ε, a new batch each step); a scaling curve needs a number that moves
only when the weights do. Here:

  held-out set   records data.num_records … data.num_records + N - 1 of the data source (N =
                 eval.val_loss_examples): the training stream reads indices below data.num_records only, so these
                 are never trained on, and they are a function of the data config (seed, size, caption style).
  levels         t_i = (i + 0.5) / 8, i = 0 … 7 (0.0625 … 0.9375; t = 0 data, t = 1 noise), equidistant in (0, 1).
  noise          one fixed ε per held-out example, ε_j = normal(fold_in(key(eval.val_loss_seed), j)), shared by the
                 8 levels; the same for every run, model and mesh.
  conditioning   the example's caption through the frozen text encoders, never dropped.
  loss           the training formulation's per-example loss (rf: the velocity MSE) at z_t = a_t x0 + b_t ε.

Reported per level ("t0" … "t7"), averaged over all 8 levels ("mean") and over all but the last, noisiest one
("mean_excl_last", the paper's average, which leaves out its t = 1 level: there the loss measures how well the model
predicts the data mean, which no model size improves much), for the raw weights and, prefixed "ema/", the EMA weights.

Exactness: one jitted call per batch of eval.val_loss_batch_size examples returns per-example losses; the host sums
them in float64 in a fixed order. The same params give bitwise the same numbers; another mesh (the batch split over
other devices) the same within float32 rounding of the forward pass (tests/scaling_val_loss_test.py: rtol 1e-5).

`evaluate(task, state, step, out_dir)` is the trainer's evaluator plug-in ("val_loss"); `ValLoss` is the reusable
core (notebooks, other trainers).
"""

import copy
import math
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.data import pipeline as data_pipeline, registry as data_registry
from rflow_jax.sharding import partition
from rflow_jax.model import text_encoders

NAME = "val_loss"  # The evaluator's name in train.evaluators and the metrics' prefix.
NUM_LEVELS = 8


def levels(num_levels: int = NUM_LEVELS) -> np.ndarray:
  """The equidistant noise levels t_i = (i + 0.5) / num_levels."""
  return (np.arange(num_levels) + 0.5) / num_levels


def heldout_set(data_config, tokenize, num_examples: int) -> dict[str, np.ndarray]:
  """The held-out examples: records data.num_records … + num_examples - 1, as training examples.

  Args:
    data_config: config.data of the run (the training stream reads indices below data_config.num_records).
    tokenize: the run's tokenizer (caption -> int array).
    num_examples: N.

  Returns:
    {"image": float32 (N, S, S, C) in [-1, 1], "tokens": int32 (N, L)}.
  """
  extended = copy.deepcopy(data_config)
  extended.num_records = data_config.num_records + num_examples  # An existing field: allowed on a locked config.
  source = data_registry.make_source(extended)
  to_example = data_pipeline.ToTrainingExample(tokenize)
  examples = [to_example.map(source[data_config.num_records + j]) for j in range(num_examples)]
  return {k: np.stack([e[k] for e in examples]) for k in ("image", "tokens")}


def fixed_noise(seed: int, num_examples: int, shape) -> np.ndarray:
  """ε_j = normal(fold_in(key(seed), j), shape) for j < num_examples: per example, not per batch or device."""
  key = jax.random.key(seed)
  draw = jax.jit(jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), tuple(shape), jnp.float32)))
  return np.asarray(draw(jnp.arange(num_examples)))


def per_level_losses(params, text_params, batch, *, model, text_stack, formulation, num_levels: int = NUM_LEVELS):
  """(B, num_levels) float32 losses of `batch` ({"image", "tokens", "eps"}) at the fixed levels; pure, jittable."""
  x0, eps = batch["image"].astype(jnp.float32), batch["eps"]
  outputs = text_stack.apply({"params": text_params}, batch["tokens"])
  context, pooled = text_encoders.drop_and_compose(outputs, None, 0.0)  # No caption dropout.

  def at_level(t):
    t = jnp.full(x0.shape[:1], t, jnp.float32)
    z_t = formulation.noise(x0, eps, t)
    out = model.apply({"params": params}, z_t, formulation.model_time(t), context, pooled)
    return formulation.loss(out, x0, eps, t, z_t)  # (B,)

  return jax.lax.map(at_level, jnp.asarray(levels(num_levels), jnp.float32)).T  # One level at a time: memory.


class ValLoss:
  """The held-out set, its noise and the jitted per-batch loss of one run; call with weights to get the scores."""

  def __init__(self, config, *, model, text_stack, tokenizer, formulation, mesh=None, rules=()):
    """Builds the held-out set (host numpy) and the jitted function; compiles on first call.

    Args:
      config: the run's config (data, eval.val_loss_* fields).
      model, text_stack, tokenizer, formulation: the run's (trainer.Setup has them all).
      mesh: the device mesh the batch is split over (its data × fsdp ways, as in training); None = one device.
      rules: logical-axis rules of the model's activation constraints.
    """
    e = config.eval
    if e.val_loss_examples % e.val_loss_batch_size:
      raise ValueError(
          f"eval.val_loss_examples={e.val_loss_examples} is not a multiple of "
          f"eval.val_loss_batch_size={e.val_loss_batch_size}"
      )
    self.batch_size = e.val_loss_batch_size
    self.data = heldout_set(config.data, tokenizer, e.val_loss_examples)
    self.data["eps"] = fixed_noise(e.val_loss_seed, e.val_loss_examples, self.data["image"].shape[1:])
    self.mesh, self.rules = mesh, tuple(rules)
    self.sharding = None
    if mesh is not None:
      ways = math.prod(mesh.shape[a] for a in partition.batch_mesh_axes(self.rules))
      if self.batch_size % ways:
        raise ValueError(
            f"eval.val_loss_batch_size={self.batch_size} is not divisible by the {ways} ways the " "mesh splits a batch"
        )
      self.sharding = partition.batch_sharding(mesh, self.rules)
    self._fn = jax.jit(
        lambda p, tp, b: per_level_losses(p, tp, b, model=model, text_stack=text_stack, formulation=formulation)
    )

  def _put(self, array: np.ndarray):
    if self.sharding is None:
      return jnp.asarray(array)
    # Every process holds the whole held-out set: each device takes its rows of the global batch.
    return jax.make_array_from_callback(array.shape, self.sharding, lambda index: array[index])

  def per_example(self, params, text_params) -> np.ndarray:
    """(N, 8) float64 losses of every held-out example at every level."""
    out = []
    n = len(self.data["image"])
    for start in range(0, n, self.batch_size):
      batch = {k: self._put(v[start : start + self.batch_size]) for k, v in self.data.items()}
      if self.mesh is None:
        out.append(self._fn(params, text_params, batch))
      else:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          out.append(self._fn(params, text_params, batch))
    return np.concatenate([np.asarray(jax.device_get(o), np.float64) for o in out])

  def scores(self, params, text_params) -> dict[str, float]:
    """{"t0" … "t7", "mean", "mean_excl_last"} of these weights."""
    per_level = self.per_example(params, text_params).mean(axis=0)
    return {
        **{f"t{i}": float(v) for i, v in enumerate(per_level)},
        "mean": float(per_level.mean()),
        "mean_excl_last": float(per_level[:-1].mean()),
    }


_CACHE = weakref.WeakKeyDictionary()  # task -> ValLoss: the held-out set is built and compiled once per run.


def for_task(task) -> ValLoss:
  """The ValLoss of a flow task (rflow_jax/train/tasks.py: config, model, text_stack, tokenizer, formulation, and the
  mesh and rules the trainer's Setup gives it), built on first use."""
  if task not in _CACHE:
    _CACHE[task] = ValLoss(
        task.config,
        model=task.model,
        text_stack=task.text_stack,
        tokenizer=task.tokenizer,
        formulation=task.formulation,
        mesh=task.mesh,
        rules=task.rules,
    )
  return _CACHE[task]


def evaluate(task, state, step: int, out_dir: str) -> dict[str, float]:
  """The "val_loss" evaluator: scores of the raw weights and, as "ema/…", of the EMA weights of `state`.

  Args:
    task: see for_task.
    state: a train state with params, ema_params and text_params.
    step: the step being evaluated (unused: the scores depend on the weights only).
    out_dir: unused (nothing but scalars to write).

  Returns:
    {"t0" … "t7", "mean", "mean_excl_last", "ema/t0" …, "ema/mean", "ema/mean_excl_last"}.
  """
  del step, out_dir
  val = for_task(task)
  raw = val.scores(state.params, state.text_params)
  ema = val.scores(state.ema_params, state.text_params)
  return {**raw, **{f"ema/{k}": v for k, v in ema.items()}}
