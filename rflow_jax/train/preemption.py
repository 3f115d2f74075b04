"""SIGTERM and SIGINT (Ctrl-C) as a request to stop cleanly: the run stops after the current step, with a checkpoint.

Cluster schedulers (GKE, SLURM, TPU maintenance events) send SIGTERM some seconds before SIGKILL; a user presses
Ctrl-C. The handler only sets a flag (no exception: a KeyboardInterrupt raised inside compilation or a JAX callback
crashes or is swallowed); all work happens in the training loop, between steps, where the state is consistent.
A second Ctrl-C aborts at once (KeyboardInterrupt).

Many processes: each process answers from its own flag, so a signal must reach every process, as cluster
schedulers send it (SLURM scancel, GKE pod termination and TPU maintenance signal every host). Known limitation: the
processes are not made to agree on the step. Two hosts that receive the signal during different steps stop at
different steps; the one that stops first leaves its peers waiting in the next collective, and the job then ends
by the scheduler's SIGKILL, resuming from the newest checkpoint all processes committed (tests/fault_injection_test.py
proves that resume bitwise). An agreement through the coordination service's key-value store was tried; it broke
that kill-and-resume test and is not used.
"""

import os
import signal
import threading

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: SIGTERM/SIGINT handlers that set a flag (previous handlers restored on exit), and `should_stop`.

  Outside the main thread (where Python cannot install signal handlers) it is a flag that is never set.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self._received = None

  @property
  def reason(self) -> str:
    """What stopped the run, for the log: the signal's name, or that another process received one."""
    return self._received or "a stop signal to another process"

  def is_set(self) -> bool:
    """Whether this process received a signal (use should_stop in a multi-process loop)."""
    return self._event.is_set()

  def should_stop(self, step: int) -> bool:
    """Called once after each dispatched `step`: whether this process stops after it (its own flag; see above)."""
    del step
    return self._event.is_set()

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self._received == "SIGINT":  # Second Ctrl-C: abort now.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self._received = self._received or name
    self._event.set()
    # os.write, not logging: a handler may run while the main thread holds the logging lock.
    os.write(2, f"{name}: stopping after the current step with a checkpoint"
                f"{' (Ctrl-C again aborts at once)' if signum == signal.SIGINT else ''}\n".encode())

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
      logging.info("Stop signals (SIGTERM, Ctrl-C) from here on: the run stops after the current step with a "
                   "checkpoint")
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    return False
