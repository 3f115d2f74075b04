"""Times the jitted train step of a config on this machine and prints one JSON line.

  python benchmarks/train_step.py [--config=configs/quickstart.py] [--steps=20] [--config.model.depth=6 ...]

Reports compile seconds, median step seconds, examples/s and achieved GFLOP/s (XLA's cost analysis of the step,
plus the native attention kernel's FLOPs, which it cannot see: flops.compiled_step_flops).
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags
import jax
import numpy as np

from rflow_jax import cli
from rflow_jax.train import trainer
from rflow_jax.utils import flops as flops_lib

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps (after one warm-up step).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  setup = trainer.Setup(config)
  state = setup.init_state()
  it = setup.data_iterator()
  batches = [setup.global_batch(next(it)) for _ in range(4)]
  t0 = time.perf_counter()
  with setup.step_context():
    compiled = setup.train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  flops = flops_lib.compiled_step_flops(compiled, config)
  state, m = setup.step(state, batches[0])
  jax.block_until_ready(m)
  times = []
  for i in range(FLAGS.steps):
    t = time.perf_counter()
    state, m = setup.step(state, batches[i % len(batches)])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  print(
      json.dumps(
          {
              "model": {k: config.model[k] for k in ("hidden_size", "depth", "patch_size")},
              "global_batch": config.train.global_batch_size,
              "compile_s": round(compile_s, 2),
              "step_s_median": round(step_s, 4),
              "examples_per_s": round(config.train.global_batch_size / step_s, 1),
              "flops_per_step": flops,
              "gflops_per_s": round(flops / step_s / 1e9, 1),
              "devices": jax.device_count(),
              "backend": jax.default_backend(),
          }
      )
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
