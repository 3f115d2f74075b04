"""Helpers of the CLI tests: run an entry point as a user does, check its one-line error contract, and make a
tiny trained workdir to run them on."""

import contextlib
import io
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_debug_run(tmp_path_factory, name: str, num_steps: int = 2) -> str:
  """A fresh temporary workdir holding a `num_steps`-step run of configs/debug.py (checkpoint, config.json)."""
  from configs import debug  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp(name))
  config = debug.get_config()
  config.train.num_steps = num_steps
  trainer.train_and_evaluate(config, workdir)
  return workdir


# Subprocesses of the CLI tests write no TensorBoard events (no test reads them there) and so skip TensorFlow's
# import, seconds of each start. Like every process of the suite, they compile without XLA's optimisation passes
# (conftest.py).
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "RFLOW_JAX_TENSORBOARD": "0"}


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a subprocess with `devices` fake CPU devices, keeping the suite's compiler flags (conftest.py)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def run_module(module, *args):
  """`python -m module args…` from the repo root; returns (exit code, stdout, stderr)."""
  proc = subprocess.run(
      [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV
  )
  return proc.returncode, proc.stdout, proc.stderr


def main_error(call) -> tuple[int, str]:
  """(exit code, stderr) of `call` inside cli.clean_errors(), as a CLI's main() runs the library function it passes
  its flags to: a user error raised there becomes the same one-line exit 2 as in a launched CLI, without a
  subprocess's seconds of imports. Each entry point still needs real launches for its flag parsing and own checks."""
  import pytest  # pylint: disable=g-import-not-at-top
  from rflow_jax import cli  # pylint: disable=g-import-not-at-top

  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
    with cli.clean_errors():
      call()
  return exit_info.value.code, stderr.getvalue()


def dir_bytes(directory) -> dict[str, bytes]:
  """{name: bytes} of every file in a directory (hidden temporaries included): compares job outputs bitwise."""
  result = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      result[name] = f.read()
  return result


def assert_one_line_error(rc, stderr, *needles):
  """Exit 2, no traceback, exactly one `error: …` line, and it contains every needle."""
  assert rc == 2, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


def train_and_signal(workdir: str, sig, wait_for: str, timeout: float = 300, log_every: int = 1000) -> tuple[int, str]:
  """Starts a debug training run (100000 steps, no periodic checkpoint, a progress line every `log_every` steps),
  sends `sig` once a line containing `wait_for` appears in its output, and returns (exit code, whole output)."""
  import time  # pylint: disable=g-import-not-at-top

  args = [
      sys.executable,
      "-m",
      "rflow_jax.main",
      "--config=configs/debug.py",
      f"--workdir={workdir}",
      "--config.train.num_steps=100000",
      "--config.train.checkpoint_every=100000",
      f"--config.train.log_every={log_every}",
  ]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
  deadline, head = time.time() + timeout, []
  while time.time() < deadline:
    line = proc.stdout.readline()
    head.append(line)
    if wait_for in line or not line:
      break
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, "".join(head) + out
