"""Ahead-of-time dry run: compile a config's train step for a mesh of fake CPU devices; allocate nothing.

  python launch/aot_compile.py --config=configs/sd3.py:d38 --mesh=data=1,fsdp=64,tensor=1 [--device_memory_gb=80]
      [--config.x=y ...]

Creates as many fake CPU devices as the mesh has (XLA_FLAGS is set before jax starts), builds the trainer's Setup
on that mesh (abstract state with its shardings), lowers and compiles the jitted train step on abstract state and
batch, and prints as its LAST line one JSON object:

  params                     MM-DiT parameters of this config (text stack excluded)
  params_sd3_text_dims       the same with SD3's real text widths (context 4096, pooled 2048)
  global_batch, mesh, devices
  per_device_memory_bytes    compiled.memory_analysis(): argument + output + temp - alias, i.e. the live buffers
                             of one device during the step (state and batch in, state and metrics out, activations
                             and gradients as temporaries; donated state counted once through the alias)
  state_bytes_per_device     the train state's share of one device (params, Adam moments, EMA, text encoders)
  flops_per_step             XLA cost analysis of the per-device program × devices (a scanned loop body counts
                             once: with model.scan_blocks it undercounts, see analytic_flops_per_step)
  analytic_flops_per_step    rflow_jax.utils.flops model FLOPs of the step
  compile_seconds, lower_seconds

With --device_memory_gb=N (decimal GB, as vendors quote HBM: 80 for H100, 95 for TPU v5p) it then exits 2 with
one line `error: ...` when per_device_memory_bytes exceeds N GB, naming the estimate and what would fit
(train.microbatches, remat "full", a larger fsdp axis; rflow_jax/train/preflight.py).

Caveats: this is XLA:CPU's buffer assignment and scheduling. TPU and GPU compilers fuse, schedule and
rematerialise differently, so treat the memory as an estimate (docs/scaling.md compares); the sizes of arguments
(the state) are exact. --mesh takes no -1; sizes multiply to the device count it creates.
"""

import os
import sys


def _preparse_mesh(argv) -> str:
  """The --mesh value, read before absl (and jax) start: the device count must be in XLA_FLAGS first."""
  for i, arg in enumerate(argv):
    if arg.startswith("--mesh="):
      return arg.split("=", 1)[1]
    if arg == "--mesh" and i + 1 < len(argv):
      return argv[i + 1]
  return "fsdp=1"


def _device_count(mesh_text: str) -> int:
  count = 1
  for part in filter(None, mesh_text.split(",")):
    count *= max(int(part.partition("=")[2] or 1), 1)
  return count


if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={_device_count(_preparse_mesh(sys.argv))}"
  )
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

from rflow_jax import cli
from rflow_jax import config_lib
from rflow_jax.model import mmdit, registry, text_encoders, variants
from rflow_jax.sharding import mesh as mesh_lib, partition
from rflow_jax.train import preflight, trainer

config_flags.DEFINE_config_file("config", None, "Config file (with optional :arg).", lock_config=True)
flags.DEFINE_string("mesh", "fsdp=1", "Mesh sizes as data=D,fsdp=F,tensor=T (omitted axes are 1; no -1).")
flags.DEFINE_float(
    "device_memory_gb",
    0.0,
    "Refuse (exit 2, one line) when the per-device estimate exceeds this " "many GB (1e9 bytes); 0 = report only.",
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def count_params(abstract_params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))


def params_with_sd3_text_dims(config) -> int:
  """MM-DiT parameters with SD3's context (4096) and pooled (2048) widths, from abstract shapes."""
  if config.model.arch != "mmdit":
    return 0
  kwargs = registry.model_kwargs(config)
  s, length = config.data.image_size, text_encoders.dims(config.text)[1]
  return variants.count_params(mmdit.MMDiT(**kwargs), (1, s, s, config.model.in_channels), (1, length, 4096), (1, 2048))


def compile_report(config) -> dict:
  """Builds Setup on all (fake) devices, lowers and compiles the train step; returns the report dict."""

  config_lib.validate(config)  # Bad mesh sizes, rules or batch splits: one line, before anything is traced.
  setup = trainer.Setup(config)
  t0 = time.perf_counter()
  with setup.step_context():
    lowered = setup.train_step.lower(setup.abstract_state, setup.batch_spec)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  devices = setup.mesh.size
  per_device = preflight.step_bytes(memory)
  analytic = setup.task.flops_per_step
  return {
      "params": count_params(setup.abstract_state.params),
      "params_sd3_text_dims": params_with_sd3_text_dims(config),
      "global_batch": config.train.global_batch_size,
      "microbatches": config.train.microbatches,
      "mesh": dict(setup.mesh.shape),
      "devices": devices,
      "model": {k: config.model[k] for k in ("depth", "hidden_size", "remat", "scan_blocks", "dtype")},
      "per_device_memory_bytes": int(per_device),
      "per_device_memory_gib": round(per_device / 2**30, 3),
      "memory_analysis": {
          k: int(getattr(memory, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
      },
      "state_bytes_per_device": partition.shard_bytes(setup.abstract_state),
      "flops_per_step": float(cost.get("flops", 0.0)) * devices,
      "analytic_flops_per_step": analytic,
      "compile_seconds": round(t2 - t1, 2),
      "lower_seconds": round(t1 - t0, 2),
  }


def main(argv):
  del argv
  config = FLAGS.config
  with cli.clean_errors():
    mesh_shape = mesh_lib.parse_mesh_flag(FLAGS.mesh)
    if min(mesh_shape) < 1:
      raise ValueError(f"--mesh={FLAGS.mesh!r}: sizes must be positive (no -1) for an AOT compile")
    with config.unlocked():
      config.sharding.mesh_shape = mesh_shape
      config.sharding.dcn_mesh_shape = (1, 1, 1)  # All fake devices live in this one process.
    try:
      report = compile_report(config)
    except ValueError as e:  # ConfigError included: a bad value is one line, exit 2.
      raise ValueError(f"bad config for mesh {FLAGS.mesh}: {e}") from None
    print(json.dumps(report), flush=True)
    if FLAGS.device_memory_gb > 0:
      mesh = report["mesh"]
      preflight.check(
          needed=report["per_device_memory_bytes"],
          limit=int(FLAGS.device_memory_gb * preflight.GB),
          source="XLA:CPU estimate",
          state=report["state_bytes_per_device"],
          microbatches=config.train.microbatches,
          remat=config.model.remat,
          fsdp=mesh["fsdp"],
          examples_per_shard=config.train.global_batch_size // (mesh["data"] * mesh["fsdp"]),
      )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
