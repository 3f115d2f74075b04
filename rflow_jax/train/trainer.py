"""train_and_evaluate(config, workdir): setup, the jitted step, the loop with CLU hooks, checkpoints, evaluations.

The loop names no task: what is trained (state, init, step, data, previews) is the task plug-in of `config.task`
(rflow_jax/train/tasks.py), and what is measured are the evaluators of `config.train.evaluators`
(rflow_jax/eval/evaluators.py). The entry point (rflow_jax/main.py) only parses flags and calls this; tests call it too.
"""

import contextlib
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from rflow_jax import config_lib
from rflow_jax.eval import evaluators as evaluators_lib
from rflow_jax.sharding import mesh as mesh_lib, partition, rules as rules_lib
from rflow_jax.train import checkpoint, finetune, hooks, multihost, periodic, preemption, preflight, profiler, resume
from rflow_jax.train import tasks
from rflow_jax.train import workdir as workdir_lib
from rflow_jax.train import writers as writers_lib  # Before anything else imports CLU's writers (no-TF stand-in).
from rflow_jax.utils import flops as flops_lib, host_memory


class NonFiniteError(RuntimeError):
  """Raised when an update (loss, gradient, update or new parameters) went non-finite under the 'halt' policy."""


def state_shardings(init_fn, mesh, rules):
  """eval_shape -> logical partition specs -> NamedShardings; also returns the unboxed abstract state."""
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  # optax.masked leaves boxes around empty MaskedNode placeholders; drop those boxes so specs match the arrays.
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  abstract = jax.tree.map(
      lambda x: x.unbox() if is_box(x) and not jax.tree.leaves(x.unbox()) else x, abstract, is_leaf=is_box
  )
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  abstract = nn.meta.unbox(abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


class Setup:
  """Everything the loop needs, built once from the config (also used by tests, benchmarks and the AOT tool)."""

  def __init__(self, config, devices=None):
    """Builds the task, mesh (over `devices`, default all) and the jitted step; compiles nothing."""
    self.config = config
    self.task = tasks.get_task(config)
    self.mesh = mesh_lib.mesh_from_config(config.sharding, devices)
    self.rules = rules_lib.rules_from_config(config.sharding)
    # The task's placement, for evaluators that shard their own batches (eval/val_loss.py).
    self.task.mesh, self.task.rules = self.mesh, self.rules
    partition.check_batch(config.train.global_batch_size, self.mesh, self.rules)
    with nn.logical_axis_rules(self.rules):  # No mesh context for init: see step_context.
      self.abstract_state, self.state_sharding = state_shardings(self.task.init, self.mesh, self.rules)
    partition.check_divisible(self.abstract_state)  # Before compiling: uneven shards fail only at the first step.
    self.batch_sharding = partition.batch_sharding(self.mesh, self.rules)
    self.batch_spec = self.bucket_spec(None)
    self.train_step = jax.jit(
        self.task.train_step,
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, None),
        donate_argnums=0,
    )

  def bucket_spec(self, size: tuple[int, int] | None):
    """The sharded global batch of images of `size` = (height, width), a data.buckets entry; None: the task's
    default shapes (self.batch_spec)."""
    g = self.config.train.global_batch_size
    spec = self.task.batch_spec(g) if size is None else self.task.batch_spec(g, size)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in spec.items()}

  def step_key(self, batch) -> tuple:
    """What tells compiled steps apart: the per-example shape of each batch array (a spec's, or a local batch's)."""
    return tuple(tuple(batch[k].shape[1:]) for k in sorted(self.batch_spec))

  def init_state(self):
    init = jax.jit(lambda k: nn.meta.unbox(self.task.init(k)), out_shardings=self.state_sharding)
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

  def compile_step(self, state, batch_spec=None):
    """The step compiled ahead of time for `state` and `batch_spec` (default self.batch_spec): an executable called
    as fn(state, batch).

    The trainer compiles once, here, and calls the executable: the memory preflight reads the same compilation (a
    later jitted call would compile again), and every process of a multi-process run can wait at a host barrier
    after compiling, before the first collective (multihost.barrier says why).
    """
    with self.step_context():
      return self.train_step.lower(state, batch_spec or self.batch_spec).compile()

  def data_iterator(self, start: int = 0):
    """This process's iterator of local batches, from global stream position `start` (examples already consumed by
    all processes together: resume.start_position)."""
    return self.task.make_iterator(jax.process_index(), jax.process_count(), start=start)

  def global_batch(self, local_batch):
    """Per-process numpy batch -> global jax arrays (the task's batch_spec keys) sharded over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch[k]))
        for k in self.batch_spec
    }


def _write_config(config, workdir):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _restore_or_init(setup, manager, workdir):
  """(state, its step or None, global data position): the newest readable checkpoint in the workdir (a damaged newer
  one is named and moved aside), else a fresh sharded init whose weights come from train.init_from when that is set:
  a workdir's newest checkpoint, or a pipeline's transformer ("pipeline:D", a fine-tune). Either way a warm start:
  step 0, fresh optimizer and data order."""
  resume_step = manager.latest_step()
  init_from = setup.config.train.init_from
  if resume_step is None:
    if not init_from:
      return setup.init_state(), None, 0
    if finetune.pipeline_dir(init_from) is not None:
      params = finetune.initial_params(setup.config, setup.task.model)  # Read (and shape-checked) before compiling.
      logging.info("Fine-tuning the transformer of %s (params and EMA; fresh optimizer, step 0)", init_from)
      # Two device copies: params and EMA are separate buffers of the donated state. From a callback, so that every
      # process of a multi-process run places only its own shards.
      place = lambda: jax.tree.map(
          lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
          params,
          setup.state_sharding.params,
      )
      return setup.init_state().replace(params=place(), ema_params=place()), None, 0
    weights, from_step = checkpoint.restore_weights(  # Checked before compiling.
        init_from, setup.abstract_state, setup.task.weight_groups, grow_depth=setup.config.train.init_grow_depth
    )
    logging.info("Weights (%s) from step %d of %s", ", ".join(weights), from_step, init_from)
    state = setup.init_state()
    # Top-level merge: blocks a depth-growing warm start did not read keep their fresh (identity) init.
    return state.replace(**{group: {**getattr(state, group), **w} for group, w in weights.items()}), None, 0
  if init_from:
    logging.info("Resuming this run's own checkpoint; train.init_from=%s is not read", init_from)

  # Before any compilation: a workdir of another model is refused (check_compatible), and nothing in it is touched.
  def attempt(step):
    checkpoint.check_compatible(manager, step, setup.abstract_state, setup.task.weight_groups)
    return checkpoint.restore(manager, step, setup.abstract_state)

  (state, position), resume_step = checkpoint.restore_newest(manager, attempt, move_damaged=True)
  logging.info("Resumed from step %d in %s", resume_step, workdir)
  start = resume.start_position(position, resume_step, setup.config.train.global_batch_size, setup.task.buckets)
  return state, resume_step, start


def _fetch_metrics(pending, step, config, manager) -> dict:
  """The loop's only host sync: metrics of the steps since the last fetch, averaged; halts on non-finite."""
  fetched = jax.device_get(pending)
  metrics = writers_lib.average_metrics(fetched)
  if config.train.nonfinite == "halt" and max(m["nonfinite"] for m in fetched) > 0:
    first = step - len(fetched) + 1
    values = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
    raise NonFiniteError(
        f"the update became non-finite (loss, gradient, update or new parameters) between steps {first} and {step} "
        f"({values}); it was not applied. "
        f"{checkpoint.last_good_message(manager)}. Set --config.train.nonfinite=skip to drop such updates."
    )
  return metrics


def _save(manager, step, state, last_ckpt, global_batch_size, plan):
  """Starts a checkpoint save; a write failure (disk full, permissions) becomes one clear error naming what is safe."""
  try:
    checkpoint.save(manager, step, state, resume.data_position(step, global_batch_size, plan))
  except OSError as e:
    raise checkpoint.CheckpointWriteError(
        f"could not write the checkpoint of step {step} in {manager.directory} ({e.strerror or e}); "
        f"the last complete checkpoint (step {last_ckpt}) is intact and a restart resumes from it"
    ) from e


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` into `workdir` (resuming from its newest checkpoint) and returns the final metrics.

  On SIGTERM (preemption) the current step finishes, a checkpoint is written and committed, and the function
  returns with results["preempted"] = True; the next call resumes from there.
  """
  config_lib.validate(config)
  tasks.validate(config)
  # A fine-tune's paths and model fields, before anything is written; a resumed run is checked by its config.json.
  config = finetune.resolve(config, check_model=not resume.has_checkpoint(workdir))
  evaluators = evaluators_lib.get(config.train.evaluators)
  workdir_lib.prepare(workdir)
  with workdir_lib.exclusive(workdir), preemption.StopSignals() as sigterm:
    workdir_lib.warn_incomplete_checkpoints(checkpoint.checkpoint_dir(workdir))
    resume.check_config(config, workdir)  # Before anything is built; config.json is rewritten only after it.
    setup = Setup(config)
    if setup.task.buckets:  # Reads every record's size: before anything is compiled.
      _report_buckets(setup.task.buckets, workdir)
    manager = checkpoint.make_manager(
        workdir, max_to_keep=config.train.keep_checkpoints, async_save=config.ckpt.async_save
    )
    state, last_ckpt, position = _restore_or_init(setup, manager, workdir)
    data_iter = setup.data_iterator(start=position)  # Built after the restore; a global position: any process count.
    step_fns = _compile_steps(setup, state)
    host_memory.release_free()  # RFLOW_JAX_MALLOC=reuse: the compiler's freed memory does not stay resident.
    _write_config(config, workdir)
    writer = writers_lib.make_writer(workdir, is_main_process=jax.process_index() == 0)
    multihost.barrier("rflow_jax_first_step")  # Process 0's extra start-up work (writer, config) is not a skew.
    try:
      results = _train_loop(setup, workdir, manager, data_iter, state, last_ckpt, writer, sigterm, evaluators, step_fns)
    finally:
      manager.wait_until_finished()  # An in-flight async save commits (or is cleanly abandoned) before we leave.
      writer.flush()
      manager.close()
  return results


def _compile_steps(setup, state) -> dict:
  """{Setup.step_key: executable}: the step compiled for each batch shape the data gives (data.buckets: each bucket
  holding records; else the one batch_spec), each checked by the memory preflight before anything runs."""
  plan = setup.task.buckets
  if plan is None:
    specs = {"": setup.batch_spec}
  else:
    specs = {name: setup.bucket_spec(size) for name, size, n in zip(plan.names(), plan.sizes, plan.counts) if n}
  step_fns = {}
  for name, spec in specs.items():
    t0 = time.time()
    step_fns[setup.step_key(spec)] = fn = setup.compile_step(state, spec)
    preflight.check_train_step(setup, fn)  # TPU/GPU: a step that cannot fit is refused before it runs.
    if plan is not None:
      logging.info("Compiled the step of bucket %s in %.1fs", name, time.time() - t0)
  return step_fns


def _report_buckets(plan, workdir) -> None:
  """Logs the records per bucket (warning of a bucket that is never drawn or repeats records within a batch) and,
  from process 0, writes them to WORKDIR/buckets.json."""
  report = plan.report()
  for name, bucket in zip(plan.names(), report["buckets"]):
    n = bucket["records"]
    logging.info("Bucket %s: %d records, drawn for %.2f%% of steps", name, n, 100 * bucket["step_probability"])
    if n == 0:
      logging.warning("Bucket %s holds no record: it is never drawn and its step is not compiled", name)
    elif n < plan.global_batch_size:
      logging.warning(
          "Bucket %s holds %d records, fewer than train.global_batch_size=%d: its batches repeat records",
          name,
          n,
          plan.global_batch_size,
      )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "buckets.json"), "w") as f:
      json.dump(report, f, indent=2)


def _train_loop(setup, workdir, manager, data_iter, state, last_ckpt, writer, sigterm, evaluators, step_fns) -> dict:
  """Steps (step_fns: _compile_steps; each batch runs the one of its shapes) until train.num_steps (or SIGTERM),
  with the periodic work of periodic.due; then the final preview and evaluation."""
  config, task = setup.config, setup.task
  num_steps = config.train.num_steps
  report = writers_lib.progress_reporter(num_steps, writer)
  step = int(jax.device_get(state.step))
  batches = hooks.wrap(data_iter, config.train, workdir=workdir, process_index=jax.process_index(), step=step)
  pending, results = [], {}
  meter = flops_lib.ThroughputMeter(task.flops_per_step, setup.mesh.size, config.train.peak_tflops_per_device)
  prof = profiler.StepProfiler(config.train.profile_steps, workdir)  # A jax.profiler trace of train.profile_steps.
  # Under RFLOW_JAX_MALLOC=reuse (CPU) the loop waits for each step before dispatching the next. Steps queued ahead
  # fragment its one untrimmed heap (peak RSS 5.3 GB with two queued, 1.6 GB waiting; glibc's default: 2.0 GB), and
  # on the CPU the host prepares the next batch on the same cores anyway (docs/results/performance.md §1e).
  wait_each_step = host_memory.reusing()
  t0 = time.time()
  while step < num_steps:
    local = next(batches)
    prof.before(step + 1, state)
    state, metrics = step_fns[setup.step_key(local)](state, setup.global_batch(local))
    step += 1
    pending.append(metrics)
    if wait_each_step:
      jax.block_until_ready(metrics)
    stop = sigterm.should_stop()  # Every process asks after every step (many processes agree: preemption.py).
    prof.after(step, (state, metrics), end=stop or step == num_steps)
    due = periodic.due(step, config.train, stopping=stop)
    if due.log:
      results = _fetch_metrics(pending, step, config, manager)
      # Only here, after the fetch has waited for the device: between fetches the loop runs ahead of the device
      # (async dispatch), so a report there would log the dispatch rate and then a stall, not steps/s.
      report(step)
      results.update(meter.measure(len(pending)))  # TFLOP/s per device and MFU (from the 2nd window on).
      results.update(flops_lib.compute_axis(config, step))  # Cumulative examples and FLOPs: the compute axis.
      if task.buckets:
        results.update(task.buckets.metrics(step))  # Examples drawn from each bucket so far.
      pending = []
      writer.write_scalars(step, results)
    if due.checkpoint:
      if pending and config.train.nonfinite == "halt":  # A step the guard dropped is never checkpointed as good.
        _fetch_metrics(pending, step, config, manager)
      _save(manager, step, state, last_ckpt, config.train.global_batch_size, task.buckets)
      last_ckpt = step
    if stop:
      manager.wait_until_finished()
      logging.warning("%s: checkpoint of step %d committed in %s; exiting", sigterm.reason, step, workdir)
      return {**results, "preempted": True, "step": step}
    if due.preview:
      task.preview(state, step, workdir, writer)
    if due.evaluate:
      _evaluate(evaluators, task, state, step, os.path.join(workdir, f"eval_step{step}"), writer)
    if due.preview or due.evaluate:
      host_memory.release_free()  # Their compiles' and buffers' freed memory (RFLOW_JAX_MALLOC=reuse).
  manager.wait_until_finished()
  logging.info("Training loop done in %.1fs", time.time() - t0)
  if config.train.preview_at_end:
    task.preview(state, step, workdir, writer)
  if config.train.eval_at_end:
    results.update(_evaluate(evaluators, task, state, step, os.path.join(workdir, "eval"), writer))
  return {**results, "preempted": False, "step": step}


def _evaluate(evaluators, task, state, step, out_dir, writer) -> dict:
  """Runs every evaluator on `state` (files under out_dir/, one subdirectory per evaluator when there are several);
  writes and returns their scores as {"<evaluator>/<score>": value}."""
  scores = {}
  for name, evaluate in evaluators.items():
    t0 = time.time()
    where = out_dir if len(evaluators) == 1 else os.path.join(out_dir, name)
    got = evaluate(task, state, step, where)
    logging.info("Evaluator %s at step %d (%.1fs): %s", name, step, time.time() - t0, json.dumps(got))
    scores.update({f"{name}/{k}": v for k, v in got.items()})
  if scores:
    writer.write_scalars(step, scores)
  return scores
