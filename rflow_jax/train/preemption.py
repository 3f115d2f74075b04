"""SIGTERM and SIGINT (Ctrl-C) as a request to stop cleanly: every process stops at one agreed step, with a checkpoint.

Cluster schedulers (GKE, SLURM, TPU maintenance events) send SIGTERM some seconds before SIGKILL; a user presses
Ctrl-C. The handler only sets a flag (no exception: a KeyboardInterrupt raised inside compilation or a JAX callback
crashes or is swallowed); all work happens in the training loop, between steps, where the state is consistent.
A second Ctrl-C aborts at once (KeyboardInterrupt).

Many processes: a signal reaches one host before another, or only one. Each process's flag enters a tiny all-reduce
(max over all devices) dispatched after every step; the loop reads the result of the all-reduce dispatched `lag`
steps earlier. Every process reads the same reduced value at the same step, so all stop at the same step and save
the same checkpoint; none steps on into a collective its peers have left. Why not JAX's preemption sync point
(multihost_utils.reached_preemption_sync_point): it hears SIGTERM only (not Ctrl-C), in a C++ handler that a Python
handler replaces, and needs the distributed runtime, so one-process runs would need a second mechanism. The
all-reduce needs nothing but the devices, works the same on CPU (gloo), GPU and TPU, and runs `lag` steps behind
the host, so the loop keeps dispatching ahead of the device (reading it blocks only until that older step is done).
"""

import collections
import os
import signal
import threading

import jax
import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: SIGTERM/SIGINT handlers that set a flag (previous handlers restored on exit), and `should_stop`.

  Outside the main thread (where Python cannot install signal handlers) it is a flag that is never set.
  """

  def __init__(self, lag: int = 2):
    self._event = threading.Event()
    self._previous = {}
    self._received = None
    self._lag = lag
    self._pending = collections.deque()
    self._reduce = None

  @property
  def reason(self) -> str:
    """What stopped the run, for the log: the signal's name, or that another process received one."""
    return self._received or "a stop signal to another process"

  def is_set(self) -> bool:
    """Whether this process received a signal (use should_stop in a multi-process loop)."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Called once after each dispatched step, by every process: whether all processes stop after this step."""
    if jax.process_count() == 1:
      return self._event.is_set()
    if self._reduce is None:
      mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
      self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all"))
      self._reduce = jax.jit(lambda x: x.max(), out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))
    local = np.full((jax.local_device_count(),), int(self._event.is_set()), np.int32)
    self._pending.append(self._reduce(jax.make_array_from_process_local_data(self._sharding, local)))
    if len(self._pending) <= self._lag:
      return False
    return bool(np.asarray(self._pending.popleft().addressable_data(0)))

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
      logging.info("Stop signals (SIGTERM, Ctrl-C) from here on: the run stops after a step all processes agree on, "
                   "with a checkpoint")
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    return False
