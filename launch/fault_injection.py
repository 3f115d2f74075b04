"""Fault-injection harness: SIGKILL a training run at random moments, restart it, compare with an uninterrupted run.

  python launch/fault_injection.py --kills=30 --steps=60 --workdir=/tmp/soak   # the long soak
  python launch/fault_injection.py --kills=10 --steps=30 --processes=2 --workdir=/tmp/soak_mp   # multi-process
  (tests/fault_injection_test.py runs a short version in CI)

Each attempt starts `python -m rflow_jax.main` on the debug config and SIGKILLs it a random 1-3 steps into its
progress (after it has committed one new checkpoint); every third kill instead waits until the next checkpoint is
being written (an Orbax temporary directory exists) and kills then. After
`--kills` kills the run is left to finish. The uninterrupted reference run uses the same config in another workdir.
Prints one JSON line: kills, kills during a checkpoint commit, restarts, the checkpoint step each restart resumed
from, steps recomputed (lost) per kill, and whether the final params (raw and EMA) and the logged loss sequence are
bitwise equal to the reference.
"""

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(workdir, steps, extra, processes=1):
  """The training command: one `python -m rflow_jax.main`, or `processes` of them (2 fake devices each, a data=P
  DCN axis over the processes) under launch/local_multiprocess.py."""
  args = [
      "--config=configs/debug.py",
      f"--workdir={workdir}",
      f"--config.train.num_steps={steps}",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=2",
      "--config.train.keep_checkpoints=2",
      "--config.train.preview_at_end=False",  # Params and losses are compared; a grid would only add a compile.
      *extra,
  ]
  if processes == 1:
    return [sys.executable, "-m", "rflow_jax.main", *args]
  return [
      sys.executable,
      os.path.join(ROOT, "launch", "local_multiprocess.py"),
      f"--num_processes={processes}",
      "--devices_per_process=2",
      "--",
      *args,
      "--config.sharding.mesh_shape=(1,-1,1)",
      f"--config.sharding.dcn_mesh_shape=({processes},1,1)",
  ]


def _children(pid):
  """PIDs of a process's children (Linux /proc): the launcher's workers."""
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(c) for c in f.read().split()]
  except OSError:
    return []


def _latest_step(workdir):
  steps = [
      int(os.path.basename(p))
      for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
      if os.path.basename(p).isdigit()
  ]
  return max(steps) if steps else None


def _logged_steps(workdir):
  """Steps that reached metrics.jsonl (a crude measure of how far an attempt got before its kill)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return max(final_losses(workdir), default=0)


def _saving(workdir):
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def final_losses(workdir) -> dict[int, float]:
  """step -> loss, the last logged value for each step (re-logged steps after a resume overwrite earlier ones)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut by SIGKILL; its step is re-logged by the resumed run.
      if "loss" in record:  # ShapesEval lines (train.eval_every) carry only evaluator scores (shapes/*).
        out[record["step"]] = record["loss"]
  return out


def _wait_for(proc, condition, timeout):
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline and not condition():
    time.sleep(0.01)


def run_with_kills(
    workdir, *, steps, kills, seed, timeout=600.0, extra=(), log=None, processes=1, env=None, commit_every=3
):
  """Runs to completion while SIGKILLing `kills` times; returns statistics.

  Kills are placed by progress, not by wall time (start-up time varies with machine load): each attempt first
  commits one new checkpoint; then a plain kill lands a random 0-2 steps later plus a random 0-0.3 s, and every
  `commit_every`-th kill lands as soon as the next checkpoint is being written (an Orbax temporary directory exists).

  With processes > 1 a kill alternates between worker 1 alone (one host dies; the launcher then stops the survivors,
  which may be blocked in a collective or a checkpoint barrier with the dead peer) and the whole job (the launcher
  and every worker at once: a pod losing its slice).
  """
  rng = random.Random(seed)
  stats = {
      "kills": 0,
      "kills_during_commit": 0,
      "restarts": 0,
      "resumed_from": [],
      "steps_lost": [],
      "single_worker_kills": 0,
  }
  env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
  while True:
    resumed = _latest_step(workdir) or 0
    stats["resumed_from"].append(resumed)
    proc = subprocess.Popen(
        _argv(workdir, steps, extra, processes),
        cwd=ROOT,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    if stats["kills"] < kills:
      # Each attempt first commits one new checkpoint (so the run progresses), then dies at a random point.
      _wait_for(proc, lambda: (_latest_step(workdir) or 0) > resumed, timeout)
      committed = _latest_step(workdir) or 0
      if stats["kills"] % commit_every == commit_every - 1:
        _wait_for(proc, lambda: _saving(workdir), timeout)
      else:
        target = committed + rng.randint(0, 2)
        _wait_for(proc, lambda: _logged_steps(workdir) >= target, timeout)
        time.sleep(rng.uniform(0.0, 0.3))
      if proc.poll() is None:
        saving = _saving(workdir)
        workers = _children(proc.pid)
        if processes > 1 and stats["kills"] % 2 == 0 and len(workers) > 1:
          os.kill(workers[1], signal.SIGKILL)
          stats["single_worker_kills"] += 1
        else:
          os.killpg(proc.pid, signal.SIGKILL)  # Its own session: the launcher and all its workers.
        proc.wait()
        stats["kills"] += 1
        stats["kills_during_commit"] += int(saving)
        stats["restarts"] += 1
        stats["steps_lost"].append(max(0, _logged_steps(workdir) - (_latest_step(workdir) or 0)))
        continue
    if proc.wait() != 0:
      raise RuntimeError(f"training exited with {proc.returncode} after {stats['kills']} kills")
    return stats


def compare(workdir, reference) -> dict:
  """Bitwise comparison of final params (raw, EMA) and of the logged loss sequence."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  out = {}
  for name, ema in (("params", False), ("ema_params", True)):
    a, _, step_a = checkpoint.restore_params(workdir, use_ema=ema)
    b, _, step_b = checkpoint.restore_params(reference, use_ema=ema)
    out[f"{name}_bitwise_equal"] = bool(
        step_a == step_b
        and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    )
  out["losses_equal"] = final_losses(workdir) == final_losses(reference)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--kills", type=int, default=30)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--processes",
      type=int,
      default=1,
      help="Training processes (2 fake CPU devices each, launch/local_multiprocess.py) when > 1.",
  )
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  from rflow_jax import cli, paths  # pylint: disable=g-import-not-at-top

  with cli.clean_errors():  # A --workdir that is a file or read-only: one line, before any run starts.
    paths.check_writable_dir(args.workdir, "--workdir")
  killed, reference = os.path.join(args.workdir, "killed"), os.path.join(args.workdir, "reference")
  t0 = time.time()
  subprocess.run(
      _argv(reference, args.steps, (), args.processes),
      cwd=ROOT,
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.STDOUT,
  )
  stats = run_with_kills(killed, steps=args.steps, kills=args.kills, seed=args.seed, processes=args.processes)
  print(
      json.dumps(
          {
              **stats,
              **compare(killed, reference),
              "steps": args.steps,
              "processes": args.processes,
              "wall_s": round(time.time() - t0, 1),
          }
      )
  )


if __name__ == "__main__":
  main()
