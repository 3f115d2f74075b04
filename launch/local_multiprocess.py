"""Runs N cooperating JAX processes on this machine, each with k fake CPU devices: a real multi-host run in small.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/debug.py --workdir=/tmp/rflow_mp

Process i runs `python -m rflow_jax.main --distributed=explicit --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i <the arguments after -->` with XLA_FLAGS asking for k host devices, so the run
sees N·k devices over N processes (CPU collectives go through gloo, jax 0.10's default). Output lines are prefixed
with [p<i>]. When a process fails, the others are terminated and the launcher exits with the failing status; a
run that outlives --timeout is terminated and exits 124.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it shortly after)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices: int, base=None) -> dict[str, str]:
  """The environment of one process: k fake host devices (replacing any count already in XLA_FLAGS), CPU only."""
  env = dict(os.environ if base is None else base)
  xla_flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def command(module: str, port: int, num_processes: int, process_id: int, args) -> list[str]:
  return [
      sys.executable,
      "-m",
      module,
      "--distributed=explicit",
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={process_id}",
      *args,
  ]


def _pump(stream, prefix: str):
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def _stop(procs, grace_s: float = 10.0):
  """SIGTERM the still-running processes (the trainer checkpoints and exits), then SIGKILL after a grace period."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(
    args,
    *,
    num_processes: int,
    devices_per_process: int,
    port: int = 0,
    module: str = "rflow_jax.main",
    timeout: float = 0.0,
) -> int:
  """Starts the processes, streams their output, and returns 0, the first failing exit status, or 124 on timeout.

  Args:
    args: arguments passed to every process after the distributed flags.
    num_processes: N.
    devices_per_process: k fake CPU devices each.
    port: coordinator port (0 = a free one).
    module: the module run with `python -m`.
    timeout: seconds before giving up (0 = none).

  Returns:
    The launcher's exit status.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1")
  port = port or free_port()
  env = process_env(devices_per_process)
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen(
        command(module, port, num_processes, i, args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    procs.append(proc)
    print(f"[launcher] process {i}: pid {proc.pid}", flush=True)  # Tests signal one process by its pid.
    pumps.append(threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}]"), daemon=True))
    pumps[-1].start()
  start, status = time.monotonic(), 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        status = failed[0].returncode
        print(f"[launcher] process {procs.index(failed[0])} exited with {status}; stopping the others", file=sys.stderr)
        break
      if timeout and time.monotonic() - start > timeout:
        status = 124
        print(f"[launcher] timeout after {timeout:.0f}s; stopping all processes", file=sys.stderr)
        break
      time.sleep(0.2)
  finally:
    _stop(procs)
    for t in pumps:
      t.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return status if status >= 0 else 128 - status  # Killed by signal s: the shell's 128 + s.


def _define_flags():
  """Flags exist only when run as a script: importing `launch` (tests do) must not claim global flag names."""
  flags.DEFINE_integer("num_processes", 2, "Number of processes (N).")
  flags.DEFINE_integer("devices_per_process", 1, "Fake CPU devices per process (k).")
  flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1; 0 picks a free one.")
  flags.DEFINE_string("module", "rflow_jax.main", "Python module each process runs (python -m MODULE).")
  flags.DEFINE_float("timeout", 0, "Seconds before all processes are terminated (0 = no limit).")


def main(argv):
  sys.exit(
      launch(
          argv[1:],
          num_processes=FLAGS.num_processes,
          devices_per_process=FLAGS.devices_per_process,
          port=FLAGS.port,
          module=FLAGS.module,
          timeout=FLAGS.timeout,
      )
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
