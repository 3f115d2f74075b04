"""Compile time of the train step vs depth, with the blocks scanned (model.scan_blocks) or unrolled.

  python benchmarks/compile_time.py [--config=configs/sd3.py:d2] [--depths=4,8,16] [--batch=2] [--config.x=y]

For each depth, builds the trainer's Setup on one device with model.depth overridden (width and everything else
from the config), then lowers and compiles the step on abstract state and batch (nothing is allocated). Prints one
JSON line per (depth, scan) and a final summary line {"depths": [...], "unrolled_s": [...], "scan_s": [...], ...}
(lower + compile wall seconds; *_cpu_s: the compile's CPU seconds, steadier on a shared machine; fusions: the
compiled program's fused kernels, which XLA:CPU generates code for one by one).
Compile time is what grows with depth; the width barely matters, so the default is a narrow model.
"""

import json
import time

from absl import app, flags
import jax
from ml_collections import config_flags

from rflow_jax import cli
from rflow_jax.train import trainer

config_flags.DEFINE_config_file("config", "configs/sd3.py:d2", "Config file (with optional :arg).", lock_config=False)
flags.DEFINE_list("depths", ["4", "8", "16"], "Depths to compile.")
flags.DEFINE_integer("batch", 2, "Global batch of the compiled step.")
FLAGS = flags.FLAGS


def time_compile(config) -> dict:
  """Lowers and compiles the train step of `config` on one device; returns the seconds of each phase."""
  t0 = time.perf_counter()
  setup = trainer.Setup(config, devices=jax.devices()[:1])
  t1 = time.perf_counter()
  with setup.step_context():
    lowered = setup.train_step.lower(setup.abstract_state, setup.batch_spec)
  t2, c2 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t3, c3 = time.perf_counter(), time.process_time()
  # Fusions are the kernels XLA generates code for; on XLA:CPU compile time grows with their number.
  fusions = compiled.as_text().count(" fusion(")
  # CPU seconds too: on a shared machine wall time mostly measures the neighbours.
  return {
      "setup_s": round(t1 - t0, 2),
      "lower_s": round(t2 - t1, 2),
      "compile_s": round(t3 - t2, 2),
      "compile_cpu_s": round(c3 - c2, 2),
      "fusions": fusions,
  }


def main(argv):
  del argv
  base = FLAGS.config
  depths = [int(d) for d in FLAGS.depths]
  summary = {
      "depths": depths,
      "unrolled_s": [],
      "scan_s": [],
      "unrolled_cpu_s": [],
      "scan_cpu_s": [],
      "hidden_size": base.model.hidden_size,
      "backend": jax.default_backend(),
  }
  for depth in depths:
    for scan in (False, True):
      config = base.copy_and_resolve_references()
      config.model.depth = depth
      config.model.scan_blocks = scan
      config.train.global_batch_size = FLAGS.batch
      row = {"depth": depth, "scan_blocks": scan, **time_compile(config)}
      print(json.dumps(row), flush=True)
      kind = "scan" if scan else "unrolled"
      summary[f"{kind}_s"].append(round(row["lower_s"] + row["compile_s"], 2))
      summary[f"{kind}_cpu_s"].append(row["compile_cpu_s"])
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
