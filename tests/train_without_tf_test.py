"""Training where TensorFlow cannot be imported (a GPU box's plain JAX install): no TensorBoard events, all else."""

import glob
import json
import os
import subprocess
import sys

import pytest

import cli_util

pytestmark = pytest.mark.slow

# Blocks `import tensorflow` (None in sys.modules makes every import of it raise ImportError), then runs the trainer
# as `python -m rflow_jax.main …` would.
_WITHOUT_TF = """
import runpy, sys
sys.modules["tensorflow"] = None
sys.argv = ["rflow_jax.main"] + sys.argv[1:]
runpy.run_module("rflow_jax.main", run_name="__main__", alter_sys=True)
"""


def test_trains_checkpoints_and_logs_without_tensorflow(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [
          sys.executable,
          "-c",
          _WITHOUT_TF,
          "--config=configs/debug.py",
          f"--workdir={workdir}",
          "--config.train.num_steps=2",
          "--config.train.log_every=1",
      ],
      cwd=cli_util.ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "TensorFlow is not installed" in proc.stderr
  assert not glob.glob(str(workdir / "events.out.tfevents*"))  # The one thing that needs TensorFlow.
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
  assert steps == [1, 2]
  assert os.path.isdir(workdir / "checkpoints" / "2")
  assert glob.glob(str(workdir / "samples" / "*.png"))
