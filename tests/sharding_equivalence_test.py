"""dp, fsdp and fsdp_tp on 8 fake CPU devices train exactly like one device; state is sharded, donated, jitted once.

The checks run in one subprocess (the device count is fixed when jax starts; this pytest process has one device):
`python tests/sharding_equivalence_test.py OUT.json` is that subprocess. All meshes start from the same
initial state and take the same synthetic batches.

Tolerance: rtol 1e-5, atol 1e-6 on every loss and every leaf of params / EMA / optimizer state after 3 steps
(float32; sharded matmuls and all-reduces sum in a different order than one device does).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import cli_util  # tests/cli_util.py (on sys.path under pytest, and as a script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
NUM_STEPS = 3
MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tp": (2, 2, 2)}
RTOL, ATOL = 1e-5, 1e-6


def _config(rules="fsdp", mesh_shape=(1, 1, 1)):
  from configs import debug  # pylint: disable=g-import-not-at-top

  c = debug.get_config()
  c.train.global_batch_size = 8  # Divisible by every mesh's batch axes (data × fsdp = 8 or 4).
  c.sharding.rules = rules
  c.sharding.mesh_shape = mesh_shape
  return c


def _batches(config, n):
  rng = np.random.default_rng(0)
  b, s, length = config.train.global_batch_size, config.data.image_size, config.text.max_length
  return [
      {
          "image": rng.uniform(-1, 1, (b, s, s, config.model.in_channels)).astype(np.float32),
          "tokens": rng.integers(1, 20, (b, length)).astype(np.int32),
      }
      for _ in range(n)
  ]


def _path(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _opt_leaves_match_params(state):
  """Every optimizer-state leaf shaped like a param (Adam mu/nu) has the param's sharding; so has each EMA leaf."""
  params = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  ema = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.ema_params)[0]}
  same = lambda a, b: a.shape == b.shape and a.sharding.is_equivalent_to(b.sharding, a.ndim)
  checked = 0
  for p, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    name = _path(p)
    owner = next((k for k in params if name.endswith("/" + k)), None)
    if owner is None:
      assert leaf.ndim == 0, f"optimizer leaf {name} mirrors no parameter"
      continue
    assert same(leaf, params[owner]), f"{name} is not sharded like {owner}"
    checked += 1
  assert all(same(ema[k], params[k]) for k in params)
  return checked


def _worker(out_path):
  """Runs in the 8-device subprocess; writes losses, final states and sharding facts to OUT.json / .npz."""
  from rflow_jax.sharding import partition  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  ref = trainer.Setup(_config(), devices=jax.devices()[:1])
  init = jax.device_get(ref.init_state())
  batches = _batches(ref.config, NUM_STEPS)
  report, finals = {}, {}
  for name, mesh_shape in {"one_device": (1, 1, 1), **MESHES}.items():
    setup = ref if name == "one_device" else trainer.Setup(_config(name, mesh_shape))
    state = jax.device_put(init, setup.state_sharding)
    losses = []
    for batch in batches:
      old = state
      state, metrics = setup.step(state, setup.global_batch(batch))
      losses.append(float(metrics["loss"]))
    entry = {
        "losses": losses,
        "devices": setup.mesh.size,
        # Donation: the input state's buffers were handed to the output.
        "donated": all(x.is_deleted() for x in jax.tree.leaves(old.params)),
        "compiles": setup.train_step._cache_size(),  # pylint: disable=protected-access
        "out_sharded_as_declared": all(
            x.sharding.is_equivalent_to(s, x.ndim)
            for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(setup.state_sharding))
        ),
    }
    if name == "fsdp":
      trained = (state.params, state.opt_state, state.ema_params)
      per_device = partition.bytes_per_device(trained)
      entry.update(
          total_bytes=partition.total_bytes(trained),
          per_device_bytes=sorted(per_device.values()),
          predicted_per_device_bytes=partition.shard_bytes(
              (setup.abstract_state.params, setup.abstract_state.opt_state, setup.abstract_state.ema_params)
          ),
          opt_leaves_checked=_opt_leaves_match_params(state),
      )
      abstract_batch = {
          k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding) for k, v in batches[0].items()
      }
      with setup.step_context():  # As Setup.step traces it.
        lowered = setup.train_step.lower(setup.abstract_state, abstract_batch).as_text()
      entry["activation_constraints"] = lowered.count("@Sharding") + lowered.count("sdy.sharding_constraint")
    report[name] = entry
    finals[name] = jax.device_get((state.params, state.ema_params, state.opt_state))
  for name in MESHES:
    diffs = []
    for a, b in zip(jax.tree.leaves(finals["one_device"]), jax.tree.leaves(finals[name])):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      diffs.append(bool(np.allclose(b, a, rtol=RTOL, atol=ATOL)))
    report[name]["state_allclose"] = all(diffs)
    report[name]["num_leaves"] = len(diffs)
    report[name]["max_abs_param_diff"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(finals["one_device"][0]), jax.tree.leaves(finals[name][0]))
    )
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("equivalence") / "report.json"
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
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_trains_like_one_device(report, name):
  ref, got = report["one_device"], report[name]
  assert got["devices"] == NUM_DEVICES and ref["devices"] == 1
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=RTOL, atol=ATOL)
  assert got["state_allclose"], f"{name}: params/EMA/optimizer state differ beyond rtol={RTOL}, atol={ATOL}"
  assert got["max_abs_param_diff"] < 1e-5
  assert got["num_leaves"] > 50
  # Training moved the params (the comparison is not trivially of untouched initial values).
  assert ref["losses"][0] != ref["losses"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one_device"] + sorted(MESHES))
def test_step_is_compiled_once_donates_and_keeps_shardings(report, name):
  got = report[name]
  assert got["compiles"] == 1, f"{name}: train_step compiled {got['compiles']} times for {NUM_STEPS} steps"
  assert got["donated"], f"{name}: the input state was not donated"
  assert got["out_sharded_as_declared"]


@pytest.mark.slow
def test_fsdp_shards_params_optimizer_and_ema_over_devices(report):
  got = report["fsdp"]
  assert got["opt_leaves_checked"] > 20  # Adam mu and nu of every trained parameter.
  assert len(got["per_device_bytes"]) == NUM_DEVICES
  ideal = got["total_bytes"] / NUM_DEVICES
  # Only the patch-embed bias and the qk-norm scales stay replicated: ~2.5% on top of 1/8 at width 32.
  assert max(got["per_device_bytes"]) <= 1.05 * ideal, (got["per_device_bytes"], ideal)
  assert min(got["per_device_bytes"]) >= ideal
  assert max(got["per_device_bytes"]) == got["predicted_per_device_bytes"]  # partition.shard_bytes is exact.
  assert got["activation_constraints"] > 0  # with_logical_constraint at block boundaries reached the HLO.


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1])
