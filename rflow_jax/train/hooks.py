"""Test and debug hooks around the training data iterator; the loop knows nothing of them.

The trainer checkpoints the iterator these wrap (the data position is its), and draws batches through them.
  * SeenIndices (train.record_seen_indices): WORKDIR/seen_indices_p{i}.json lists the `index` of every example this
    process trained on (tests check the sharding: no duplicates, no gaps).
  * PoisonAt (train.poison_step): the batch of that step is all-NaN images, to exercise the non-finite guard.
  * SignalAt (train.signal_step, train.signal_process): one process sends itself SIGTERM before a step, as when a
    preemption notice reaches one host of many (the stop must still be agreed: train/preemption.py).
"""

import json
import os
import signal
import time

import numpy as np


class _Wrapper:
  """An iterator of batches drawn from the iterator it wraps."""

  def __init__(self, inner):
    self.inner = inner

  def __iter__(self):
    return self


class SeenIndices(_Wrapper):
  """Rewrites `path` after every batch with the indices of all examples this process has drawn so far."""

  def __init__(self, inner, path: str):
    super().__init__(inner)
    self.path = path
    self.seen = []

  def __next__(self):
    batch = next(self.inner)
    self.seen.extend(int(i) for i in batch["index"])
    with open(self.path, "w") as f:
      json.dump(self.seen, f)
    return batch


class _AtStep(_Wrapper):
  """Passes batches through, and acts on the one of step `at_step` (1-based); `step` = the steps already taken."""

  def __init__(self, inner, at_step: int, step: int):
    super().__init__(inner)
    self.at_step = at_step
    self.step = step

  def __next__(self):
    batch = next(self.inner)
    self.step += 1
    return self.act(batch) if self.step == self.at_step else batch

  def act(self, batch):
    raise NotImplementedError


class PoisonAt(_AtStep):
  """Replaces the images (precomputed records: the latent means) of the batch of step `at_step` with NaNs."""

  def act(self, batch):
    key = "image" if "image" in batch else "latent_mean"
    return {**batch, key: np.full_like(batch[key], np.nan)}


class SignalAt(_AtStep):
  """SIGTERM to this process as it draws the batch of step `at_step`, then a pause of PAUSE_S.

  The pause stands for a slow step: JAX's preemption notifier polls for the signal once a second, and the debug
  config's steps take milliseconds, so without it a short test run could end before the notice is heard.
  """

  PAUSE_S = 2.0

  def act(self, batch):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(self.PAUSE_S)
    return batch


def wrap(data_iter, train_config, *, workdir: str, process_index: int, step: int):
  """The data iterator with the hooks config.train asks for (none by default)."""
  if train_config.record_seen_indices:
    data_iter = SeenIndices(data_iter, os.path.join(workdir, f"seen_indices_p{process_index}.json"))
  if train_config.poison_step > 0:
    data_iter = PoisonAt(data_iter, train_config.poison_step, step)
  if train_config.signal_step > 0 and train_config.signal_process == process_index:
    data_iter = SignalAt(data_iter, train_config.signal_step, step)
  return data_iter
