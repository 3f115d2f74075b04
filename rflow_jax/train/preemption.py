"""SIGTERM as a request to stop cleanly: the loop finishes its step, checkpoints, and returns.

Cluster schedulers (GKE, SLURM, TPU maintenance events) send SIGTERM some seconds before SIGKILL. The handler only
sets a flag; all work happens in the training loop, between steps, where the state is consistent.
"""

import signal
import threading


class SigtermFlag:
  """Context manager installing a SIGTERM handler that sets a flag (restoring the previous handler on exit).

  Outside the main thread (where Python cannot install signal handlers) it is a flag that is never set.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def is_set(self) -> bool:
    return self._event.is_set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
