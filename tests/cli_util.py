"""Helpers of the CLI tests: run an entry point as a user does, and check its one-line error contract."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args):
  """`python -m module args…` from the repo root; returns (exit code, stdout, stderr)."""
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
  return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, stderr, *needles):
  """Exit 2, no traceback, exactly one `error: …` line, and it contains every needle."""
  assert rc == 2, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
