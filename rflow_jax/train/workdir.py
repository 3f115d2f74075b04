"""Workdir safety: one trainer per workdir, and a loud word about checkpoints a crash left half-written."""

import contextlib
import fcntl
import glob
import os

import jax
from absl import logging

LOCK_FILE = ".rflow_jax.lock"


class WorkdirBusyError(ValueError):
  """Another trainer holds the workdir."""


@contextlib.contextmanager
def exclusive(workdir: str):
  """Holds an exclusive advisory lock on WORKDIR/.rflow_jax.lock for the duration of a run.

  flock is released by the kernel when the process dies (even by SIGKILL), so a crashed run never leaves a stale
  lock. Only process 0 locks: in a multi-host run the other processes share process 0's run. Advisory locks need a
  local or POSIX filesystem; on object stores (gs://) this is a no-op and the scheduler must ensure exclusivity.
  """
  if jax.process_index() != 0 or "://" in workdir:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise WorkdirBusyError(
          f"workdir {workdir!r} is in use by another trainer (pid {holder}); " "stop it or choose another --workdir"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(workdir: str) -> None:
  """Creates the workdir and checks it is a writable directory, before anything expensive happens."""
  if "://" in workdir:
    return  # Object stores: Orbax and the writers create what they need.
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir!r} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir!r} is not writable: {e.strerror or e}") from None


def warn_incomplete_checkpoints(ckpt_dir: str) -> list[str]:
  """Logs a warning for each temporary (uncommitted) checkpoint directory; Orbax never restores those."""
  partial = sorted(glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*")))
  for path in partial:
    logging.warning("Ignoring incomplete checkpoint %s (a save was interrupted); it will not be restored", path)
  return partial
