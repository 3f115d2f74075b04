"""Pod-safe preemption and elastic resume, with real 2-process runs (jax.distributed + gloo on localhost).

  * SIGTERM to ONE of two processes: both stop at the same step, save one checkpoint and exit 0; resumed on the same
    2 processes, the run ends bitwise equal to an uninterrupted 2-process run (params and EMA params).
  * Elastic resume: that 2-process checkpoint resumed on 1 process (another mesh), and a 1-process checkpoint resumed
    on 2 processes, train on exactly the examples of an uninterrupted run, in the same order, and end with params
    equal to the uninterrupted 2-process run within the tolerance of tests/multiprocess_test.py (the meshes differ,
    so reductions reorder).

Runs: launch/local_multiprocess.py (2 processes x 2 fake CPU devices, mesh data=2 across processes x fsdp=2) and
`python -m rflow_jax.main` with 4 fake devices in one process (fsdp=4).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import debug
from rflow_jax.train import checkpoint, tasks

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, RTOL, ATOL = 6, 1e-5, 1e-6
COMMON = ["--config=configs/debug.py", f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2", "--config.train.record_seen_indices=True", "--config.ckpt.async_save=False"]
TWO = ["--config.sharding.mesh_shape=(1,-1,1)", "--config.sharding.dcn_mesh_shape=(2,1,1)"]
ONE = ["--config.sharding.mesh_shape=(1,-1,1)", "--config.sharding.dcn_mesh_shape=(1,1,1)"]


def _env(**extra):
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **extra}


def _launch(workdir, *extra, term_p1=False):
  """A 2-process run; with term_p1, SIGTERM goes to process 1 only, once its stop handlers are installed."""
  cmd = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "--num_processes=2",
         "--devices_per_process=2", "--timeout=1500", "--", f"--workdir={workdir}", *COMMON, *TWO, *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines, pid1 = [], None
  for line in iter(proc.stdout.readline, ""):
    lines.append(line)
    m = re.match(r"\[launcher\] process 1: pid (\d+)", line)
    if m:
      pid1 = int(m.group(1))
    if term_p1 and line.startswith("[p1]") and "Stop signals" in line:
      os.kill(pid1, signal.SIGTERM)
  proc.wait(timeout=60)
  out = "".join(lines)
  assert proc.returncode == 0, out[-6000:]
  return out


def _single(workdir, *extra):
  """A 1-process run over 4 fake devices (fsdp=4)."""
  proc = subprocess.run([sys.executable, "-m", "rflow_jax.main", f"--workdir={workdir}", *COMMON, *ONE, *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=1500,
                        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert proc.returncode == 0, proc.stderr[-6000:]
  return proc.stderr


def _seen(workdir, processes):
  """Examples trained on by this start of the run, in global-batch order (row r of step k = process r // B)."""
  per = [json.load(open(os.path.join(workdir, f"seen_indices_p{p}.json"))) for p in range(processes)]
  b = 4 // processes
  return [i for k in range(len(per[0]) // b) for p in range(processes) for i in per[p][k * b:(k + 1) * b]]


def _host_params(workdir):
  params, _, step = checkpoint.restore_params(workdir, use_ema=False)
  ema, _, _ = checkpoint.restore_params(workdir, use_ema=True)
  return [np.asarray(x) for x in jax.tree.leaves((params, ema))], step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("elastic")
  w = {name: str(base / name) for name in ("uninterrupted", "preempted", "to_one", "from_one")}
  out = {"uninterrupted": _launch(w["uninterrupted"])}
  out["preempted"] = _launch(w["preempted"], "--config.train.num_steps=1000", term_p1=True)
  stop_step = checkpoint.latest_step(w["preempted"])
  seen = {"preempted": _seen(w["preempted"], 2)}
  shutil.copytree(w["preempted"], w["to_one"])
  out["resumed"] = _launch(w["preempted"])  # Same 2 processes: bitwise.
  seen["resumed"] = _seen(w["preempted"], 2)
  _single(w["to_one"])  # 2 processes -> 1.
  seen["to_one"] = _seen(w["to_one"], 1)
  _single(w["from_one"], "--config.train.num_steps=2")  # 1 process -> 2.
  seen["from_one_first"] = _seen(w["from_one"], 1)
  _launch(w["from_one"])
  seen["from_one_rest"] = _seen(w["from_one"], 2)
  return {"workdirs": w, "out": out, "stop_step": stop_step, "seen": seen}


def _reference_stream():
  config = debug.get_config()
  it = tasks.get_task(config).make_iterator(0, 1)
  return [int(i) for _ in range(NUM_STEPS) for i in next(it)["index"]]


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_bitwise(runs):
  s, out = runs["stop_step"], runs["out"]["preempted"]
  assert s is not None and 0 < s < 1000, out[-3000:]
  assert re.search(rf"\[p1\].*SIGTERM: checkpoint of step {s} committed", out), out[-3000:]
  assert re.search(rf"\[p0\].*a stop signal to another process: checkpoint of step {s} committed", out), out[-3000:]
  assert s < NUM_STEPS  # So that the resume below trains.
  resumed, step = _host_params(runs["workdirs"]["preempted"])
  reference, ref_step = _host_params(runs["workdirs"]["uninterrupted"])
  assert step == ref_step == NUM_STEPS
  for a, b in zip(resumed, reference):
    np.testing.assert_array_equal(a, b)


def test_elastic_resume_sees_the_uninterrupted_stream_and_matches_it(runs):
  seen, stream, s = runs["seen"], _reference_stream(), runs["stop_step"]
  assert seen["preempted"] + seen["resumed"] == stream  # 2 -> 2.
  assert seen["preempted"] + seen["to_one"] == stream  # 2 -> 1.
  assert seen["from_one_first"] + seen["from_one_rest"] == stream  # 1 -> 2.
  assert len(seen["preempted"]) == 4 * s
  reference, _ = _host_params(runs["workdirs"]["uninterrupted"])
  for name in ("to_one", "from_one"):
    got, step = _host_params(runs["workdirs"][name])
    assert step == NUM_STEPS
    assert all(np.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(got, reference)), (
        name, max(float(np.max(np.abs(a - b))) for a, b in zip(got, reference)))
