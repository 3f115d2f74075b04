"""SIGKILL after a checkpoint commit and during one, restart each time: the run ends bitwise equal to an
uninterrupted one, with the same logged losses. The long soak is `python launch/fault_injection.py`."""

import glob
import os
import re
import subprocess

import pytest

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from launch import fault_injection

pytestmark = pytest.mark.slow

# Every restart is a fresh process, started with the CLI tests' environment: no TensorBoard writer (the losses
# compared are metrics.jsonl's) and no XLA optimisation passes. The reference run gets the same environment, hence
# the same programs.
ENV = cli_util.ENV


def test_sigkills_after_and_during_commits_resume_bitwise(tmp_path):
  """Two kills, one of each placement: the 1st a random 0-2 steps (plus 0-0.3 s) after its attempt committed a new
  checkpoint, the 2nd, in an attempt that has already resumed once, while the next checkpoint commits (an Orbax
  temporary directory exists). Each restart is a fresh process that resumes from the latest checkpoint; the third
  attempt finishes. (With async saves and checkpoint_every=2 the 1st kill usually lands during a commit too.)"""
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  steps = 12
  subprocess.run(
      fault_injection._argv(reference, steps, ()),
      cwd=fault_injection.ROOT,
      check=True,  # pylint: disable=protected-access
      stdout=subprocess.DEVNULL,
      stderr=subprocess.STDOUT,
      env=ENV,
  )
  stats = fault_injection.run_with_kills(killed, steps=steps, kills=2, seed=0, env=ENV, commit_every=2)
  result = fault_injection.compare(killed, reference)
  print(stats, result)
  assert stats["kills"] == 2 and stats["kills_during_commit"] >= 1, stats
  # Restarts really resumed from checkpoints, each from a later one (every attempt commits a new checkpoint before
  # its kill, checkpoint_every=2): the 2nd restart resumes from step 4 or later.
  assert stats["resumed_from"][0] == 0 and stats["resumed_from"] == sorted(set(stats["resumed_from"])), stats
  assert len(stats["resumed_from"]) == 3 and stats["resumed_from"][2] >= 4, stats
  # At most the steps since the last committed checkpoint: one interval (2) plus those run while a save commits.
  assert max(stats["steps_lost"]) <= 6, stats
  assert result == {"params_bitwise_equal": True, "ema_params_bitwise_equal": True, "losses_equal": True}
  assert sorted(fault_injection.final_losses(killed)) == list(range(1, steps + 1))
  assert not glob.glob(os.path.join(killed, "events.out.tfevents.*"))  # RFLOW_JAX_TENSORBOARD=0 was obeyed.
  # train.preview_at_end=False (fault_injection._argv) was obeyed: finished runs, and no grid (the debug config has
  # no mid-run previews; train_test checks the grid a default run writes).
  assert not os.path.exists(os.path.join(reference, "samples")) and not os.path.exists(os.path.join(killed, "samples"))


def test_two_process_run_agrees_on_a_one_host_sigterm_and_resumes_bitwise(tmp_path):
  """The multi-host path: 2 processes × 2 fake devices (data=2 over processes, fsdp=2 within).

  A SIGTERM reaches worker 1 only (train.signal_step: a preemption notice for one host): both processes agree on
  the step, save it and exit 0. The restart resumes from that multi-process checkpoint (each process's data iterator
  included) and ends bitwise equal to an uninterrupted 2-process run. (SIGKILLs of one worker or of the whole job:
  `python launch/fault_injection.py --processes=2`, a soak too long for the suite.)"""
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  steps, signal_step = 4, 1
  subprocess.run(
      fault_injection._argv(reference, steps, (), processes=2),
      cwd=fault_injection.ROOT,
      check=True,  # pylint: disable=protected-access
      stdout=subprocess.DEVNULL,
      stderr=subprocess.STDOUT,
      env=ENV,
      timeout=600,
  )
  signalled = subprocess.run(
      fault_injection._argv(
          killed,
          steps,
          (
              f"--config.train.signal_step={signal_step}",  # pylint: disable=protected-access
              "--config.train.signal_process=1",
          ),
          processes=2,
      ),
      cwd=fault_injection.ROOT,
      capture_output=True,
      text=True,
      env=ENV,
      timeout=600,
      check=False,
  )
  assert signalled.returncode == 0, signalled.stdout[-5000:]
  stopped = dict(re.findall(r"\[p(\d)\].*checkpoint of step (\d+) committed in .*; exiting", signalled.stdout))
  assert set(stopped) == {"0", "1"} and stopped["0"] == stopped["1"], signalled.stdout[-5000:]
  stop_step = int(stopped["0"])
  assert signal_step <= stop_step < steps and fault_injection._latest_step(killed) == stop_step  # pylint: disable=protected-access
  stats = fault_injection.run_with_kills(killed, steps=steps, kills=0, seed=1, processes=2, env=ENV)
  result = fault_injection.compare(killed, reference)
  print(stop_step, stats, result)
  assert stats["resumed_from"] == [stop_step], stats
  assert result == {"params_bitwise_equal": True, "ema_params_bitwise_equal": True, "losses_equal": True}
  assert sorted(fault_injection.final_losses(killed)) == list(range(1, steps + 1))
