"""train_and_evaluate(config, workdir): setup, the jitted step, the loop with CLU hooks, checkpoints, final eval.

The entry point (rflow_jax/main.py) only parses flags and calls this; tests call it too.
"""

import contextlib
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from rflow_jax import config_lib
from rflow_jax.data import pipeline as data_pipeline, registry as data_registry
from rflow_jax.flow import formulations
from rflow_jax.model import text_encoders
from rflow_jax.sampling import pipeline as sampling
from rflow_jax.sharding import mesh as mesh_lib, partition, rules as rules_lib
from rflow_jax.train import checkpoint, optimizer as optim_lib, preemption, resume, step as step_lib
from rflow_jax.train import workdir as workdir_lib
from rflow_jax.train.state import TrainState
from rflow_jax.utils import flops as flops_lib


class NonFiniteError(RuntimeError):
  """Raised when the loss or gradient norm went non-finite under the 'halt' policy."""


def build_model(config):
  """The backbone of `config.model`; context/pooled widths follow the text stack."""
  return config_lib.build_model(config)


def _dummy_inputs(config, batch_size: int = 1):
  s, m = config.data.image_size, config.model
  x = jnp.zeros((batch_size, s, s, m.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.float32)
  context = jnp.zeros((batch_size, 2 * config.text.max_length, config.text.width), jnp.float32)
  pooled = jnp.zeros((batch_size, config.text.width), jnp.float32)
  return x, t, context, pooled


def make_init_fn(config, model, text_stack, tx):
  """A function key -> TrainState whose params still carry their logical-axis boxes (for partition specs)."""
  def init(key):
    params = model.init(key, *_dummy_inputs(config))["params"]
    text_params = text_encoders.init_params(text_stack, config.text)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(lambda p: p, params), text_params=text_params,
                      skipped_steps=jnp.zeros((), jnp.int32))
  return init


def state_shardings(init_fn, mesh, rules):
  """eval_shape -> logical partition specs -> NamedShardings; also returns the unboxed abstract state."""
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  # optax.masked leaves boxes around empty MaskedNode placeholders; drop those boxes so specs match the arrays.
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  abstract = jax.tree.map(lambda x: x.unbox() if is_box(x) and not jax.tree.leaves(x.unbox()) else x, abstract,
                          is_leaf=is_box)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  abstract = nn.meta.unbox(abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


class Setup:
  """Everything the loop needs, built once from the config (also used by tests and the AOT tool)."""

  def __init__(self, config, devices=None):
    """Builds model, optimizer, mesh (over `devices`, default all) and the jitted step; compiles nothing."""
    self.config = config
    self.model = build_model(config)
    self.tokenizer, self.text_stack = text_encoders.build(config.text)
    self.formulation = formulations.get(config.flow.formulation, shift=config.flow.shift)
    self.tx = optim_lib.make_optimizer(config.optim, config.train.num_steps)
    self.mesh = mesh_lib.mesh_from_config(config.sharding, devices)
    self.rules = rules_lib.rules_from_config(config.sharding)
    partition.check_batch(config.train.global_batch_size, self.mesh, self.rules)
    self.init_fn = make_init_fn(config, self.model, self.text_stack, self.tx)
    with nn.logical_axis_rules(self.rules):  # No mesh context for init: see step_context.
      self.abstract_state, self.state_sharding = state_shardings(self.init_fn, self.mesh, self.rules)
    partition.check_divisible(self.abstract_state)  # Before compiling: uneven shards fail only at the first step.
    self.batch_sharding = partition.batch_sharding(self.mesh, self.rules)
    step_fn = step_lib.bind(config, model=self.model, text_stack=self.text_stack, formulation=self.formulation,
                            tx=self.tx)
    self.train_step = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, None), donate_argnums=0)

  def init_state(self):
    init = jax.jit(lambda k: nn.meta.unbox(self.init_fn(k)), out_shardings=self.state_sharding)
    with nn.logical_axis_rules(self.rules):  # Placement comes from out_shardings; no mesh context (step_context).
      return init(jax.random.key(self.config.seed))

  @contextlib.contextmanager
  def step_context(self):
    """Mesh and rules the step is traced under (AOT tools use it around .lower() too).

    jax.set_mesh rather than `with mesh:`: Flax applies nn.with_logical_constraint only under an abstract mesh, so
    under the legacy context (deprecated since jax 0.10) every activation constraint is a silent no-op. Init runs
    under no mesh at all: its batch-of-one dummy forward cannot be constrained to the batch axes.
    """
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def step(self, state, batch):
    with self.step_context():
      return self.train_step(state, batch)

  def global_batch(self, local_batch):
    """Per-process numpy batch -> global jax arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch[k]))
            for k in ("image", "tokens")}


def _data_iterator(config, tokenizer, start: int = 0):
  source = data_registry.make_source(config.data)
  return data_pipeline.make_train_iterator(
      source=source, tokenize=tokenizer, global_batch_size=config.train.global_batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), worker_count=config.data.worker_count,
      start=start)


def _write_config(config, workdir):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _restore_or_init(setup, manager, workdir):
  """(state, its step or None, global data position): the newest readable checkpoint in the workdir (a damaged newer
  one is named and moved aside), else a fresh sharded init whose weights come from train.init_from's newest checkpoint
  when that is set (a warm start: step 0, fresh optimizer and data order)."""
  resume_step = manager.latest_step()
  init_from = setup.config.train.init_from
  if resume_step is None:
    if not init_from:
      return setup.init_state(), None, 0
    weights, from_step = checkpoint.restore_weights(  # Checked before compiling.
        init_from, setup.abstract_state, grow_depth=setup.config.train.init_grow_depth)
    logging.info("Weights (params, EMA, text encoders) from step %d of %s", from_step, init_from)
    state = setup.init_state()
    # Top-level merge: blocks a depth-growing warm start did not read keep their fresh (identity) init.
    return state.replace(**{group: {**getattr(state, group), **w} for group, w in weights.items()}), None, 0
  if init_from:
    logging.info("Resuming this run's own checkpoint; train.init_from=%s is not read", init_from)
  # Before any compilation: a workdir of another model is refused (check_compatible), and nothing in it is touched.
  def attempt(step):
    checkpoint.check_compatible(manager, step, setup.abstract_state)
    return checkpoint.restore(manager, step, setup.abstract_state)
  (state, position), resume_step = checkpoint.restore_newest(manager, attempt, move_damaged=True)
  logging.info("Resumed from step %d in %s", resume_step, workdir)
  return state, resume_step, resume.start_position(position, resume_step, setup.config.train.global_batch_size)


def _fetch_metrics(pending, step, config, manager) -> dict:
  """The loop's only host sync: metrics of the steps since the last fetch, averaged; halts on non-finite."""
  fetched = jax.device_get(pending)
  metrics = step_lib.average_metrics(fetched)
  metrics["skipped_steps"] = float(fetched[-1]["skipped_steps"])
  if config.train.nonfinite == "halt" and max(m["nonfinite"] for m in fetched) > 0:
    first = step - len(fetched) + 1
    raise NonFiniteError(
        f"the update became non-finite (loss, gradient, update or new parameters) between steps {first} and {step} "
        f"(loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); it was not applied. "
        f"{checkpoint.last_good_message(manager)}. Set --config.train.nonfinite=skip to drop such updates.")
  return metrics


def _record_seen(workdir, seen, local_batch):
  """Debug (train.record_seen_indices): WORKDIR/seen_indices_p{i}.json lists the examples this process trained on."""
  seen.extend(int(i) for i in local_batch["index"])
  with open(os.path.join(workdir, f"seen_indices_p{jax.process_index()}.json"), "w") as f:
    json.dump(seen, f)


def _append_metrics(workdir, step, metrics):
  """Also appends the scalars to WORKDIR/metrics.jsonl: plain text any tool can read. Training scalars and
  ShapesEval scores of one step are separate lines; a resumed run re-logs the steps after its checkpoint, and for
  each key of a step the last line that has it is the one that counts."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")


def _save(manager, step, state, last_ckpt, global_batch_size):
  """Starts a checkpoint save; a write failure (disk full, permissions) becomes one clear error naming what is safe."""
  try:
    checkpoint.save(manager, step, state, resume.data_position(step, global_batch_size))
  except OSError as e:
    raise checkpoint.CheckpointWriteError(
        f"could not write the checkpoint of step {step} in {manager.directory} ({e.strerror or e}); "
        f"the last complete checkpoint (step {last_ckpt}) is intact and a restart resumes from it") from e


def _poison(local_batch):
  """Fault injection (config.train.poison_step): a batch of NaN images, to exercise the non-finite guard."""
  return {**local_batch, "image": np.full_like(local_batch["image"], np.nan)}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` into `workdir` (resuming from its newest checkpoint) and returns the final metrics.

  On SIGTERM (preemption) the current step finishes, a checkpoint is written and committed, and the function
  returns with results["preempted"] = True; the next call resumes from there.
  """
  config_lib.validate(config)
  workdir_lib.prepare(workdir)
  with workdir_lib.exclusive(workdir), preemption.StopSignals() as sigterm:
    workdir_lib.warn_incomplete_checkpoints(checkpoint.checkpoint_dir(workdir))
    resume.check_config(config, workdir)  # Before anything is built; config.json is rewritten only after it.
    setup = Setup(config)
    manager = checkpoint.make_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.ckpt.async_save)
    state, last_ckpt, position = _restore_or_init(setup, manager, workdir)
    data_iter = _data_iterator(config, setup.tokenizer, start=position)  # Global position: any process count.
    _write_config(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    try:
      results = _train_loop(config, workdir, setup, manager, data_iter, state, last_ckpt, writer, sigterm)
    finally:
      manager.wait_until_finished()  # An in-flight async save commits (or is cleanly abandoned) before we leave.
      writer.flush()
      manager.close()
  return results


def _train_loop(config, workdir, setup, manager, data_iter, state, last_ckpt, writer, sigterm) -> dict:
  """Steps until train.num_steps (or SIGTERM), with periodic metrics, checkpoints and grids; then the final eval."""
  num_steps = config.train.num_steps
  # Called after each metrics fetch only (see the loop), so every call reports: every_secs=0, no every_steps (which
  # would demand a call per step).
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=0.0)
  sampler = sampling.Sampler.from_setup(setup)
  step = int(jax.device_get(state.step))
  pending, results = [], {}
  meter = flops_lib.ThroughputMeter(flops_lib.train_flops_per_step(config), setup.mesh.size,
                                    config.train.peak_tflops_per_device)
  seen = [] if config.train.record_seen_indices else None
  scores_shapes = config.data.name == "shapes"  # ShapesEval scores the built-in shapes task only.
  shapes_eval_every = config.train.eval_every if scores_shapes else 0
  t0 = time.time()
  while step < num_steps:
    local = next(data_iter)
    if seen is not None:
      _record_seen(workdir, seen, local)
    if step + 1 == config.train.poison_step:
      local = _poison(local)
    state, metrics = setup.step(state, setup.global_batch(local))
    step += 1
    pending.append(metrics)
    stop = sigterm.should_stop(step)  # The same answer on every process at the same step.
    if step % config.train.log_every == 0 or step == num_steps or stop:
      results = _fetch_metrics(pending, step, config, manager)
      # Only here, after the fetch has waited for the device: between fetches the loop runs ahead of the device
      # (async dispatch), so a report there would log the dispatch rate and then a stall, not steps/s.
      report(step)
      results.update(meter.measure(len(pending)))  # TFLOP/s per device and MFU (from the 2nd window on).
      pending = []
      writer.write_scalars(step, results)
      _append_metrics(workdir, step, results)
    if step % config.train.checkpoint_every == 0 or step == num_steps or stop:
      if pending and config.train.nonfinite == "halt":  # A step the guard dropped is never checkpointed as good.
        _fetch_metrics(pending, step, config, manager)
      _save(manager, step, state, last_ckpt, config.train.global_batch_size)
      last_ckpt = step
    if stop:
      manager.wait_until_finished()
      logging.warning("%s: checkpoint of step %d committed in %s; exiting", sigterm.reason, step, workdir)
      return {**results, "preempted": True, "step": step}
    if config.train.sample_every and step % config.train.sample_every == 0 and step != num_steps:
      sampler.write_grid(state, step, workdir, writer)
    if shapes_eval_every and step % shapes_eval_every == 0 and step != num_steps:
      _shapes_eval(config, sampler, state, step, workdir, writer, f"eval_step{step}")
  manager.wait_until_finished()
  logging.info("Training loop done in %.1fs", time.time() - t0)
  sampler.write_grid(state, step, workdir, writer)
  if config.train.eval_at_end and scores_shapes:
    results.update(_shapes_eval(config, sampler, state, step, workdir, writer, "eval"))
  return {**results, "preempted": False, "step": step}


def _shapes_eval(config, sampler, state, step, workdir, writer, subdir) -> dict:
  """ShapesEval of `state` on fresh prompts (images in WORKDIR/subdir); logs and returns {"shapes_eval/k": v}."""
  from rflow_jax.eval import run_shapes  # pylint: disable=g-import-not-at-top  (scipy only when evaluating)
  t0 = time.time()
  scores = run_shapes.evaluate(sampler, sampler.params_of(state), state.text_params,
                               per_kind=config.sample.eval_per_kind, seed=config.sample.eval_seed,
                               out_dir=os.path.join(workdir, subdir))
  prefixed = {f"shapes_eval/{k}": v for k, v in scores.items()}
  logged = {k: v for k, v in prefixed.items() if k != "shapes_eval/n"}  # The prompt count is not a score.
  writer.write_scalars(step, logged)
  _append_metrics(workdir, step, logged)
  logging.info("ShapesEval at step %d (%.1fs): %s", step, time.time() - t0, json.dumps(scores))
  return prefixed
