"""A minimal trainer for tasks other than "flow" (today: the VAE), driven only through the Task interface.

Interim: the plug-in trainer (rflow_jax/train/tasks.py registry in trainer.py) replaces this module; until then
trainer.train_and_evaluate hands `config.task != "flow"` here. It reuses the trainer's pieces (sharded init from
logical axes, one jitted donated step, Orbax state + grain position, resume, the non-finite policy, CLU metrics and
metrics.jsonl, SIGTERM checkpoints) and runs the task's evaluator (vae_recon) every train.eval_every steps and at the
end.
"""

import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from rflow_jax.sharding import mesh as mesh_lib, partition, rules as rules_lib
from rflow_jax.train import checkpoint, preemption, trainer, vae_task, workdir as workdir_lib

TASKS = {"vae": vae_task.VAETask}


def _evaluate(task, state, step, workdir, writer, subdir) -> dict:
  from rflow_jax.eval import vae_recon  # pylint: disable=g-import-not-at-top  (scipy only when evaluating)
  t0 = time.time()
  scores = vae_recon.evaluate(task, state, step, os.path.join(workdir, subdir))
  scores = {f"vae_recon/{k}": v for k, v in scores.items()}
  writer.write_scalars(step, scores)
  trainer._append_metrics(workdir, step, scores)  # pylint: disable=protected-access
  logging.info("vae_recon at step %d (%.1fs): %s", step, time.time() - t0, json.dumps(scores))
  return scores


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `TASKS[config.task]` per `config` into `workdir`, resuming from its newest checkpoint."""
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}; valid: {sorted(TASKS) + ['flow']}")
  task = TASKS[config.task](config)  # Validates its config section before anything is compiled.
  workdir_lib.prepare(workdir)
  with workdir_lib.exclusive(workdir), preemption.SigtermFlag() as sigterm:
    workdir_lib.warn_incomplete_checkpoints(checkpoint.checkpoint_dir(workdir))
    mesh = mesh_lib.mesh_from_config(config.sharding)
    rules = rules_lib.rules_from_config(config.sharding)
    partition.check_batch(config.train.global_batch_size, mesh, rules)
    with nn.logical_axis_rules(rules):
      abstract, shardings = trainer.state_shardings(task.init, mesh, rules)
    partition.check_divisible(abstract)
    batch_sharding = partition.batch_sharding(mesh, rules)
    step_fn = jax.jit(task.train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                      donate_argnums=0)
    manager = checkpoint.make_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.ckpt.async_save)
    data_iter = task.make_iterator(jax.process_index(), jax.process_count())
    last_ckpt = manager.latest_step()
    if last_ckpt is None:
      with nn.logical_axis_rules(rules):
        state = jax.jit(lambda k: nn.meta.unbox(task.init(k)), out_shardings=shardings)(jax.random.key(config.seed))
    else:
      state = checkpoint.restore(manager, last_ckpt, abstract, data_iter)
      logging.info("Resumed from step %d in %s", last_ckpt, workdir)
    trainer._write_config(config, workdir)  # pylint: disable=protected-access
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    try:
      return _loop(config, workdir, task, step_fn, (mesh, rules, batch_sharding), manager, data_iter, state,
                   last_ckpt, writer, sigterm)
    finally:
      manager.wait_until_finished()
      writer.flush()
      manager.close()


def _loop(config, workdir, task, step_fn, placement, manager, data_iter, state, last_ckpt, writer, sigterm) -> dict:
  # pylint: disable=protected-access
  mesh, rules, batch_sharding = placement
  t = config.train
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer, every_secs=0.0)
  keys = tuple(task.batch_spec(t.global_batch_size))
  step = int(jax.device_get(state.step))
  pending, results, t0 = [], {}, time.time()
  while step < t.num_steps:
    local = next(data_iter)
    if step + 1 == t.poison_step:
      local = trainer._poison(local)
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k])) for k in keys}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state, metrics = step_fn(state, batch)
    step += 1
    pending.append(metrics)
    stop = sigterm.is_set()
    if step % t.log_every == 0 or step == t.num_steps or stop:
      results = trainer._fetch_metrics(pending, step, config, last_ckpt)
      report(step)
      results["steps_per_sec"] = len(pending) / max(time.time() - t0, 1e-9)
      pending, t0 = [], time.time()
      writer.write_scalars(step, results)
      trainer._append_metrics(workdir, step, results)
    if step % t.checkpoint_every == 0 or step == t.num_steps or stop:
      trainer._save(manager, step, state, data_iter, last_ckpt)
      last_ckpt = step
    if stop:
      manager.wait_until_finished()
      return {**results, "preempted": True, "step": step}
    if t.sample_every and step % t.sample_every == 0 and step != t.num_steps:
      task.preview(state, step, workdir, writer)
    if t.eval_every and step % t.eval_every == 0 and step != t.num_steps:
      _evaluate(task, state, step, workdir, writer, f"eval_step{step}")
  manager.wait_until_finished()
  task.preview(state, step, workdir, writer)
  if t.eval_at_end:
    results.update(_evaluate(task, state, step, workdir, writer, "eval"))
  return {**results, "preempted": False, "step": step}
