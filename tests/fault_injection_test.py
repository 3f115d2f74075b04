"""SIGKILL at random moments (some during a checkpoint commit), restart each time: the run ends bitwise equal to an
uninterrupted one, with the same logged losses. The long soak is `python launch/fault_injection.py`."""

import subprocess

import pytest

from launch import fault_injection

pytestmark = pytest.mark.slow


def test_ten_sigkills_resume_bitwise(tmp_path):
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  steps = 30
  subprocess.run(fault_injection._argv(reference, steps, ()), cwd=fault_injection.ROOT, check=True,  # pylint: disable=protected-access
                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
  stats = fault_injection.run_with_kills(killed, steps=steps, kills=10, seed=0)
  result = fault_injection.compare(killed, reference)
  print(stats, result)
  assert stats["kills"] == 10 and stats["kills_during_commit"] >= 3
  # Restarts really resumed from checkpoints, and got further over time.
  assert len(set(stats["resumed_from"])) >= 4 and max(stats["resumed_from"]) >= 6, stats
  # At most the steps since the last committed checkpoint: one interval (2) plus those run while a save commits.
  assert max(stats["steps_lost"]) <= 6, stats
  assert result == {"params_bitwise_equal": True, "ema_params_bitwise_equal": True, "losses_equal": True}
  assert sorted(fault_injection.final_losses(killed)) == list(range(1, steps + 1))
