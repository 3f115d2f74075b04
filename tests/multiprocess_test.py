"""A real 2-process run (jax.distributed + gloo on localhost) equals a 1-process run; checkpoints move between
process counts and meshes (elastic resume).

The run, in three starts on configs/debug.py:
  1. one process with 4 fake CPU devices (fsdp=4) trains steps 1-2 and checkpoints step 2;
  2. `launch/local_multiprocess.py` resumes it on 2 processes × 2 fake devices (1 -> 2 processes): the mesh is data=2
     across the processes (sharding.dcn_mesh_shape, one "slice" per process) × fsdp=2 within each; steps 3-4, a
     checkpoint after each;
  3. `python tests/multiprocess_test.py WORKDIR OUT.json` (one process, 4 devices, fsdp=4) trains the same config
     from scratch (the uninterrupted reference), resumes the 2-process checkpoint of step 3 on its own mesh
     (2 -> 1 processes) to step 4, and restores the 2-process checkpoint of step 4 on its mesh and on one device.
Checked:
  * the per-step losses (metrics.jsonl) and the final params equal the uninterrupted 1-process run's, and so do the
    params of the 2 -> 1 resume (rtol 1e-5, atol 1e-6: float32, reductions reorder across meshes and processes);
  * the examples the two processes trained on (train.record_seen_indices) have no duplicates and no gaps: together
    they are exactly the uninterrupted stream's steps 3-4, row by row; the 2 -> 1 resume trains on step 4's examples;
  * the checkpoint restores on a 1-process fsdp=4 mesh and on a single device, bit-identical on both.
"""

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cli_util  # tests/cli_util.py (on sys.path under pytest, and as this script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, DEVICES_PER_PROCESS, NUM_STEPS = 2, 2, 4
ONE_PROCESS_STEPS = 2  # Start 1 (one process) trains these; the 2-process start resumes after them.
RTOL, ATOL = 1e-5, 1e-6
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    "train.record_seen_indices": True,
    "train.preview_at_end": False,  # Params, losses and indices are compared; a grid would add a sampler compile.
}
ONE_PROCESS_MESH = {"sharding.mesh_shape": (1, -1, 1), "sharding.dcn_mesh_shape": (1, 1, 1)}  # fsdp=4.


def _env(**extra):
  # Numerics need no XLA optimisation passes; compiling without them is ~2x faster on CPU.
  # The CLI tests' environment (no TensorBoard writer: losses come from metrics.jsonl; no XLA optimisation passes).
  return {**cli_util.ENV, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}


@functools.cache
def _launcher():
  spec = importlib.util.spec_from_file_location(
      "local_multiprocess", os.path.join(ROOT, "launch", "local_multiprocess.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _logged_losses(workdir):
  """Per-step losses from process 0's metrics.jsonl (the one file every run writes; no TensorFlow needed)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  return [losses[s] for s in sorted(losses)]


def _flags(overrides):
  return [f"--config.{k}={v}".replace(" ", "") for k, v in overrides.items()]


def _elastic_resume(config, workdir, step):
  """2 -> 1 processes: the 2-process checkpoint of `step` (alone, in a fresh workdir) resumed on this process's mesh
  to the end; returns (its final params, the example indices it trained on)."""
  import jax  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top

  elastic = workdir + "_elastic"
  shutil.copytree(os.path.join(workdir, "checkpoints", str(step)), os.path.join(elastic, "checkpoints", str(step)))
  shutil.copy(os.path.join(workdir, "config.json"), elastic)
  trainer.train_and_evaluate(config, elastic)
  params, _, final = checkpoint.restore_params(elastic, use_ema=False)
  assert final == NUM_STEPS, final
  with open(os.path.join(elastic, "seen_indices_p0.json")) as f:
    return jax.device_get(params), json.load(f)


def _worker(workdir, out_path):
  """The 1-process side (4 devices): reference run, 2 -> 1 resume, checkpoint restore on two other meshes."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from configs import debug  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import checkpoint, trainer  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS and jax.process_count() == 1
  config = debug.get_config()
  for key, value in {**OVERRIDES, **ONE_PROCESS_MESH}.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  elastic_params, elastic_seen = _elastic_resume(config.copy_and_resolve_references(), workdir, NUM_STEPS - 1)
  setup = trainer.Setup(config)
  state = setup.init_state()
  data = setup.data_iterator()
  losses, indices = [], []
  for _ in range(NUM_STEPS):
    local = next(data)
    indices.append(local["index"].tolist())
    state, metrics = setup.step(state, setup.global_batch(local))
    losses.append(float(metrics["loss"]))
  ref_params = jax.device_get(state.params)

  restored = {}
  with checkpoint.make_manager(workdir, read_only=True) as manager:
    step = manager.latest_step()
    for name, target in (
        ("fsdp4", setup),
        ("one_device", trainer.Setup(config.copy_and_resolve_references(), devices=jax.devices()[:1])),
    ):
      out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target.abstract_state)))
      got = out["state"]
      restored[name] = {
          "mesh": dict(target.mesh.shape),
          "sharded_as_requested": all(
              a.sharding.is_equivalent_to(s.sharding, a.ndim)
              for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(target.abstract_state))
          ),
          "params": jax.device_get(got.params),
      }
  # Host copy of the saved params, via the 1-device restore (checkpoint.restore_params, which restores without a
  # target, refuses a checkpoint written on another topology; see docs/scaling.md).
  host_params = restored["one_device"]["params"]

  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  report = {
      "ref_losses": losses,
      "mp_losses": _logged_losses(workdir),
      "ref_indices": indices,
      "ckpt_step": step,
      "seen": {p: json.load(open(os.path.join(workdir, f"seen_indices_p{p}.json"))) for p in range(NUM_PROCESSES)},
      "params_allclose": all(
          np.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(leaves(ref_params), leaves(host_params))
      ),
      "elastic_params_allclose": all(
          np.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(leaves(ref_params), leaves(elastic_params))
      ),
      "elastic_seen": elastic_seen,
      "max_abs_param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(ref_params), leaves(host_params))),
      "num_param_leaves": len(leaves(host_params)),
      "restored": {
          name: {
              "mesh": r["mesh"],
              "sharded_as_requested": r["sharded_as_requested"],
              "bit_exact": all(np.array_equal(a, b) for a, b in zip(leaves(r["params"]), leaves(host_params))),
          }
          for name, r in restored.items()
      },
  }
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mp") / "run")
  all_devices = cli_util.xla_flags(NUM_PROCESSES * DEVICES_PER_PROCESS)
  args = ["--config=configs/debug.py", f"--workdir={workdir}", *_flags(OVERRIDES)]
  start = subprocess.run(  # Start 1: one process, 4 devices, steps 1-2.
      [
          sys.executable,
          "-m",
          "rflow_jax.main",
          *args,
          *_flags(ONE_PROCESS_MESH),
          f"--config.train.num_steps={ONE_PROCESS_STEPS}",
      ],
      cwd=ROOT,
      env=_env(XLA_FLAGS=all_devices),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert start.returncode == 0, start.stderr[-5000:]
  args += ["--config.sharding.mesh_shape=(1,-1,1)", f"--config.sharding.dcn_mesh_shape=({NUM_PROCESSES},1,1)"]
  launch = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "launch", "local_multiprocess.py"),
          f"--num_processes={NUM_PROCESSES}",
          f"--devices_per_process={DEVICES_PER_PROCESS}",
          "--timeout=540",
          "--",
          *args,
      ],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert launch.returncode == 0, launch.stdout[-6000:] + launch.stderr[-2000:]
  out = os.path.join(os.path.dirname(workdir), "report.json")
  worker = subprocess.run(
      [sys.executable, os.path.abspath(__file__), workdir, out],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=_env(XLA_FLAGS=all_devices),
      timeout=600,
      check=False,
  )
  assert worker.returncode == 0, worker.stderr[-5000:]
  with open(out) as f:
    return {**json.load(f), "launcher_output": launch.stdout}


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(report):
  assert "Connecting to JAX distributed service" in report["launcher_output"]
  assert f"Resumed from step {ONE_PROCESS_STEPS}" in report["launcher_output"]  # 1 -> 2 processes.
  assert len(report["mp_losses"]) == NUM_STEPS
  np.testing.assert_allclose(report["mp_losses"], report["ref_losses"], rtol=RTOL, atol=ATOL)
  assert report["params_allclose"], report["max_abs_param_diff"]
  assert report["num_param_leaves"] > 20


@pytest.mark.slow
def test_processes_see_disjoint_halves_of_the_one_process_stream(report):
  seen, ref = report["seen"], report["ref_indices"][ONE_PROCESS_STEPS:]  # The 2-process start's steps.
  union = seen["0"] + seen["1"]
  assert len(union) == len(set(union)) == len(ref) * 4  # No duplicates, the full global batch every step.
  assert sorted(union) == sorted(i for batch in ref for i in batch)  # No gaps: exactly the 1-process examples.
  half = len(ref[0]) // NUM_PROCESSES
  for k, batch in enumerate(ref):  # Row r of the global batch is the same example for 1 or 2 processes.
    assert seen["0"][k * half : (k + 1) * half] + seen["1"][k * half : (k + 1) * half] == batch


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(report):
  """Elastic resume 2 -> 1: the same examples as the uninterrupted stream, and its params (the 1 -> 2 direction is
  the 2-process start itself: test_two_processes_train_exactly_like_one)."""
  assert report["elastic_seen"] == report["ref_indices"][NUM_STEPS - 1]
  assert report["elastic_params_allclose"]


@pytest.mark.slow
def test_checkpoint_restores_on_other_meshes_bit_exactly(report):
  assert report["ckpt_step"] == NUM_STEPS
  assert report["restored"]["fsdp4"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["restored"]["one_device"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  for name, r in report["restored"].items():
    assert r["bit_exact"], name
    assert r["sharded_as_requested"], name


def test_launcher_propagates_a_failing_exit_status(capfd):
  launcher = _launcher()
  status = launcher.launch([], num_processes=2, devices_per_process=1, module="rflow_jax_no_such_module", timeout=60)
  assert status == 1
  assert "No module named rflow_jax_no_such_module" in capfd.readouterr().out


def test_launcher_sets_each_process_device_count_and_flags():
  launcher = _launcher()
  env = launcher.process_env(3, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"})
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3"
  assert env["JAX_PLATFORMS"] == "cpu"
  cmd = launcher.command("rflow_jax.main", 1234, 2, 1, ["--workdir=w"])
  assert cmd[1:] == [
      "-m",
      "rflow_jax.main",
      "--distributed=explicit",
      "--coordinator_address=127.0.0.1:1234",
      "--num_processes=2",
      "--process_id=1",
      "--workdir=w",
  ]
  with pytest.raises(ValueError, match="num_processes=0"):
    launcher.launch([], num_processes=0, devices_per_process=1)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1], sys.argv[2])
