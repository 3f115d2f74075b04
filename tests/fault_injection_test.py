"""SIGKILL at random moments (some during a checkpoint commit), restart each time: the run ends bitwise equal to an
uninterrupted one, with the same logged losses. The long soak is `python launch/fault_injection.py`."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
import fault_injection  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow


def test_ten_sigkills_resume_bitwise(tmp_path):
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  steps = 16
  subprocess.run(fault_injection._argv(reference, steps, ()), cwd=fault_injection.ROOT, check=True,  # pylint: disable=protected-access
                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
  stats = fault_injection.run_with_kills(killed, steps=steps, kills=10, seed=0, min_delay=2.0, max_delay=12.0)
  result = fault_injection.compare(killed, reference)
  print(stats, result)
  assert stats["kills"] == 10
  assert result == {"params_bitwise_equal": True, "ema_params_bitwise_equal": True, "losses_equal": True}
  assert sorted(fault_injection.final_losses(killed)) == list(range(1, steps + 1))
