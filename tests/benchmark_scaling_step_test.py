"""benchmarks/scaling_step.py --quick: one row per size with a step time and attention's share, and the summary."""

import json
import subprocess
import sys

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
import pytest


@pytest.mark.slow
def test_quick_sweep_reports_step_time_and_attention_share():
  proc = subprocess.run(
      [sys.executable, "benchmarks/scaling_step.py", "--quick"],
      cwd=cli_util.ROOT,
      env=cli_util.ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
  summary = lines[-1]
  assert summary["rows"] == lines[:-1] and summary["rows"]  # One line per size as it finishes, then all of them.
  for row in summary["rows"]:
    assert row["step_s"] > 0 and row["attention_fwd_bwd_s"] > 0, row
    # Attention runs inside the step, so its fwd+bwd time times the depth is a share of the step (from the row's
    # times, which are rounded to 0.1 ms: hence the tolerance).
    share = min(row["attention_fwd_bwd_s"] * row["depth"] / row["step_s"], 1.0)
    assert 0 < row["attention_share"] <= 1 and row["attention_share"] == pytest.approx(share, rel=0.1), row
  assert summary["backend"] == "cpu"
