"""SIGTERM and SIGINT (Ctrl-C) as a request to stop cleanly: the run stops after a step, with a checkpoint.

Cluster schedulers (GKE, SLURM, TPU maintenance events) send SIGTERM some seconds before SIGKILL; a user presses
Ctrl-C. Nothing is raised from a handler (a KeyboardInterrupt inside compilation or a JAX callback crashes or is
swallowed); the training loop asks `should_stop` after each step, where the state is consistent. A second Ctrl-C
aborts at once (KeyboardInterrupt).

One process: the handler sets a flag and the run stops after the current step.

Many processes: every process must save the same step, or the first to stop leaves its peers waiting in the next
collective (a hang, and no checkpoint). A signal may reach one host before another, or only one. JAX's preemption
sync manager (started by jax.distributed.initialize) agrees on the step: its own SIGTERM handler reports the notice
to the coordination service, every process uploads how many steps it has run, and all stop at one past the
furthest (multihost_utils.reached_preemption_sync_point, asked once per step with the count of steps this process
has run since it started: every process resumes from the same checkpoint, so the counts agree). So in a
multi-process run SIGTERM is left to JAX's handler, and Ctrl-C is forwarded to it as a SIGTERM to this process.
"""

import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _agreed() -> bool:
  """Whether stop decisions go through JAX's preemption sync point (multi-process runs with the service on)."""
  return jax.process_count() > 1 and jax.config.jax_enable_preemption_service


class StopSignals:
  """Context manager: SIGTERM/SIGINT handlers (previous handlers restored on exit) and `should_stop`.

  Outside the main thread (where Python cannot install signal handlers) it never asks to stop.
  """

  def __init__(self):
    self._previous = {}
    self._received = None
    self._agreed = False
    self._steps_run = 0

  @property
  def reason(self) -> str:
    """What stopped the run, for the log."""
    if self._agreed:
      return f"{self._received or 'a stop signal'} (to this or another process; all processes stop at this step)"
    return self._received or "a stop signal"

  @property
  def _when(self) -> str:
    return "at a step all processes agree on" if self._agreed else "after the current step"

  def should_stop(self) -> bool:
    """Called by every process once after each dispatched step: whether to checkpoint and stop after it."""
    if not self._agreed:
      return self._received is not None
    self._steps_run += 1  # This process's calls, not the global step: a resumed run's first step is not 1 (above).
    return multihost_utils.reached_preemption_sync_point(self._steps_run)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self._received == "SIGINT":  # Second Ctrl-C: abort now.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self._received = self._received or name
    # os.write, not logging: a handler may run while the main thread holds the logging lock.
    os.write(
        2,
        f"{name}: stopping {self._when} with a checkpoint"
        f"{' (Ctrl-C again aborts at once)' if signum == signal.SIGINT else ''}\n".encode(),
    )
    if self._agreed:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's handler: the notice every process hears.

  def __enter__(self):
    self._agreed = _agreed()
    if threading.current_thread() is threading.main_thread():
      # Multi-process: SIGTERM stays with JAX's preemption notifier (a Python handler would replace it).
      for sig in (signal.SIGINT,) if self._agreed else SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
      logging.info("Stop signals (SIGTERM, Ctrl-C) from here on: the run stops %s with a checkpoint", self._when)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    return False
