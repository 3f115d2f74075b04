"""Test and debug hooks around the training data iterator; the loop knows nothing of them.

The trainer checkpoints the iterator these wrap (the data position is its), and draws batches through them.
  * SeenIndices (train.record_seen_indices): WORKDIR/seen_indices_p{i}.json lists the `index` of every example this
    process trained on (tests check the sharding: no duplicates, no gaps).
  * PoisonAt (train.poison_step): the batch of that step is all-NaN images, to exercise the non-finite guard.
"""

import json
import os

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


class PoisonAt(_Wrapper):
  """Replaces the images (precomputed records: the latent means) of the batch of step `poison_step` (1-based) with
  NaNs; `step` = the steps already taken."""

  def __init__(self, inner, poison_step: int, step: int):
    super().__init__(inner)
    self.poison_step = poison_step
    self.step = step

  def __next__(self):
    batch = next(self.inner)
    self.step += 1
    if self.step == self.poison_step:
      key = "image" if "image" in batch else "latent_mean"
      batch = {**batch, key: np.full_like(batch[key], np.nan)}
    return batch


def wrap(data_iter, train_config, *, workdir: str, process_index: int, step: int):
  """The data iterator with the hooks config.train asks for (none by default)."""
  if train_config.record_seen_indices:
    data_iter = SeenIndices(data_iter, os.path.join(workdir, f"seen_indices_p{process_index}.json"))
  if train_config.poison_step > 0:
    data_iter = PoisonAt(data_iter, train_config.poison_step, step)
  return data_iter
