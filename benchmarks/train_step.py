"""Times the jitted train step of a config on this machine and prints one JSON line.

  python benchmarks/train_step.py [--config=configs/quickstart.py] [--steps=20] [--config.model.depth=6 ...]
  python benchmarks/train_step.py ... --against=model.residual_grad_barrier=False   # A/B, side by side

Reports compile seconds, median step seconds, examples/s and achieved GFLOP/s (XLA's cost analysis of the step,
plus the native attention kernel's FLOPs, which it cannot see: flops.compiled_step_flops). With `--against`, a second
step with those overrides is compiled too and the two alternate step by step (so that machine noise hits both);
the line then has both medians under "a" (the config) and "b" (the overrides) and b's time over a's.
"""

import ast

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
flags.DEFINE_list(
    "against", [], "Overrides (section.field=value, Python literals) of a second step, timed alternately."
)
FLAGS = flags.FLAGS


def overridden(config, overrides: list[str]):
  """A copy of `config` with each "section.field=value" set (value a Python literal, else a string)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for item in overrides:
      path, sep, raw = item.partition("=")
      section, _, field = path.rpartition(".")
      parent = config
      for key in filter(None, section.split(".")):
        parent = parent[key]
      if not sep or field not in parent:
        raise ValueError(f"--against {item!r}: expected section.field=value naming an existing config field")
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
      parent[field] = value
  return config


class Timed:
  """One config's compiled step, its state and its timings."""

  def __init__(self, config):
    self.config, self.setup = config, trainer.Setup(config)
    self.state = self.setup.init_state()
    it = self.setup.data_iterator()
    self.batches = [self.setup.global_batch(next(it)) for _ in range(4)]
    t0 = time.perf_counter()
    with self.setup.step_context():
      compiled = self.setup.train_step.lower(self.state, self.batches[0]).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = flops_lib.compiled_step_flops(compiled, config)
    self.times = []
    self.run(0, record=False)  # Warm-up.

  def run(self, i: int, record: bool = True) -> None:
    t = time.perf_counter()
    self.state, m = self.setup.step(self.state, self.batches[i % len(self.batches)])
    jax.block_until_ready(m)
    if record:
      self.times.append(time.perf_counter() - t)

  def summary(self) -> dict:
    step_s = float(np.median(self.times))
    return {
        "compile_s": round(self.compile_s, 2),
        "step_s_median": round(step_s, 4),
        "examples_per_s": round(self.config.train.global_batch_size / step_s, 1),
        "flops_per_step": self.flops,
        "gflops_per_s": round(self.flops / step_s / 1e9, 1),
    }


def main(argv):
  del argv
  config = FLAGS.config
  other = overridden(config, FLAGS.against) if FLAGS.against else None  # Bad overrides fail before any compile.
  sides = [Timed(config)] + ([Timed(other)] if other is not None else [])
  for i in range(FLAGS.steps):
    for side in sides:
      side.run(i)
  line = {
      "model": {k: config.model[k] for k in ("hidden_size", "depth", "patch_size")},
      "global_batch": config.train.global_batch_size,
  }
  if FLAGS.against:
    a, b = (side.summary() for side in sides)
    line |= {"a": a, "b": b, "against": FLAGS.against, "b_over_a": round(b["step_s_median"] / a["step_s_median"], 3)}
  else:
    line |= sides[0].summary()
  line |= {"devices": jax.device_count(), "backend": jax.default_backend()}
  print(json.dumps(line))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
