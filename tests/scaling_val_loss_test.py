"""The validation-loss protocol: held-out split, bitwise reproducibility, mesh invariance; the WSD schedule.

Mesh checks run in one subprocess with 4 fake CPU devices (the device count is fixed when jax starts):
`python tests/scaling_val_loss_test.py OUT.json` is that subprocess. It scores the same params with the "val_loss"
evaluator on one device, on data=2 and on data=2 × fsdp=2, twice on one device and once more with a fresh
evaluator.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cli_util  # tests/cli_util.py (on sys.path under pytest, and as a script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

NUM_DEVICES = 4
MESHES = {"one": ((1, 1, 1), 1), "data2": ((2, 1, 1), 2), "data2_fsdp2": ((2, 2, 1), 4)}


def _config():
  from configs import debug  # pylint: disable=g-import-not-at-top

  c = debug.get_config()
  c.train.evaluators = ("val_loss",)
  c.eval.val_loss_examples = 8
  c.eval.val_loss_batch_size = 4
  c.data.num_records = 100
  return c


def _subprocess_main(out_path):
  import jax  # pylint: disable=g-import-not-at-top
  from rflow_jax.eval import val_loss  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  results, state = {}, None
  for name, (shape, n) in MESHES.items():
    config = _config()
    config.sharding.mesh_shape = shape
    setup = trainer.Setup(config, devices=jax.devices()[:n])
    if state is None:
      state = setup.init_state()
      # Distinct raw and EMA weights: one step of noise on the raw params.
      leaves, tree = jax.tree.flatten(state.params)
      keys = jax.random.split(jax.random.key(1), len(leaves))
      state = state.replace(
          params=jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
      )
      state = jax.device_get(state)
    placed = jax.device_put(state, setup.state_sharding)
    results[name] = val_loss.evaluate(setup.task, placed, 0, "")
    if name == "one":
      results["one_again"] = val_loss.evaluate(setup.task, placed, 0, "")
      fresh = val_loss.ValLoss(
          config,
          model=setup.task.model,
          text_stack=setup.task.text_stack,
          tokenizer=setup.task.tokenizer,
          formulation=setup.task.formulation,
          mesh=setup.mesh,
          rules=setup.rules,
      )
      results["one_fresh"] = fresh.scores(placed.params, placed.text_params)
  with open(out_path, "w") as f:
    json.dump(results, f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("val_loss") / "report.json"
  env = {
      **os.environ,
      "XLA_FLAGS": cli_util.xla_flags(NUM_DEVICES),
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": ROOT,
  }
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), str(out)],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
def test_val_loss_is_bitwise_reproducible_and_equal_across_meshes(report):
  one = report["one"]
  assert set(one) == {f"t{i}" for i in range(8)} | {"mean", "mean_excl_last"} | {f"ema/t{i}" for i in range(8)} | {
      "ema/mean",
      "ema/mean_excl_last",
  }
  assert report["one_again"] == one  # Bitwise: the same floats.
  assert report["one_fresh"] == {k: v for k, v in one.items() if not k.startswith("ema/")}
  assert one["mean"] != one["ema/mean"]  # Raw and EMA weights differ here, and so do their scores.
  for name in ("data2", "data2_fsdp2"):
    for key, value in one.items():
      np.testing.assert_allclose(report[name][key], value, rtol=1e-5, err_msg=f"{name} {key}")
  np.testing.assert_allclose(one["mean"], np.mean([one[f"t{i}"] for i in range(8)]), rtol=1e-12)
  np.testing.assert_allclose(one["mean_excl_last"], np.mean([one[f"t{i}"] for i in range(7)]), rtol=1e-12)


def test_heldout_set_is_the_records_after_the_training_range():
  from rflow_jax.data import registry, shapes  # pylint: disable=g-import-not-at-top
  from rflow_jax.eval import val_loss  # pylint: disable=g-import-not-at-top

  config = _config()
  tokenize = lambda text: np.arange(8) + len(text)  # pylint: disable=unnecessary-lambda-assignment
  held = val_loss.heldout_set(config.data, tokenize, 3)
  assert len(registry.make_source(config.data)) == 100  # The training stream reads indices 0 … 99 only.
  for j in range(3):
    record = shapes.ShapesSource(seed=config.data.seed, num_records=103)[100 + j]
    np.testing.assert_array_equal(held["image"][j], record["image"].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(held["tokens"][j], tokenize(record["caption"]))
  assert config.data.num_records == 100  # The caller's config is not changed.
  np.testing.assert_allclose(val_loss.levels(), [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375])
  # Fixed noise is per example: the first two of four equal the two of two.
  np.testing.assert_array_equal(val_loss.fixed_noise(5, 4, (2, 2))[:2], val_loss.fixed_noise(5, 2, (2, 2)))


def test_wsd_schedule_and_its_decay_branches():
  from configs import base  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import optimizer  # pylint: disable=g-import-not-at-top

  c = base.get_config().optim
  c.decay, c.decay_fraction, c.warmup_steps, c.learning_rate = "wsd", 0.2, 10, 1.0
  long, branch = optimizer.learning_rate_schedule(c, 1000), optimizer.learning_rate_schedule(c, 250)
  assert optimizer.wsd_decay_start(1000, 0.2) == 800 and optimizer.wsd_decay_start(250, 0.2) == 200
  np.testing.assert_allclose(
      [float(long(s)) for s in (0, 5, 10, 500, 800, 900, 1000)], [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6
  )
  # The branch agrees with the long run until its decay starts (step 200), then reaches 0 at 250.
  steps = np.arange(0, 201)
  np.testing.assert_array_equal([float(branch(s)) for s in steps], [float(long(s)) for s in steps])
  np.testing.assert_allclose([float(branch(s)) for s in (225, 250)], [0.5, 0.0], atol=1e-6)


if __name__ == "__main__":
  _subprocess_main(sys.argv[1])
