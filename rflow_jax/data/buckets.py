"""Aspect-ratio buckets (data.buckets): which bucket each record trains in, and which bucket each step draws.

A bucket is a (height, width) pixel size. The configured buckets have about equal pixel counts (within
MAX_PIXEL_RATIO of each other), so every step costs about the same and sees about as many image tokens.

Assignment. Record i goes to the bucket whose aspect ratio is nearest its stored width / height in log space
(|log(w/h) - log(bw/bh)|: 2:1 is as far from 1:1 as from 4:1); a tie goes to the bucket listed first. The source
then resizes the image to cover the bucket and crops its centre (rflow_jax/data/arrayrecord.py). Precompute
(rflow_jax/precompute.py) fits and encodes each record the same way and stores the assignment, so training on
precomputed latents (h/f, w/f per bucket) draws the same plan without reading the images.

The stream. Step s trains on one bucket b(s), drawn with probability proportional to the buckets' record counts from
a hash of (seed, s) alone: every host computes the same b(s) without talking to the others, and a resumed run draws
what an uninterrupted one would. Weighting by count keeps every record equally likely to be seen: a small bucket is
drawn rarely, never dropped. Each bucket has its own shuffled stream of its records (grain's IndexSampler, repeating
forever, reshuffled each epoch); step s's global batch is the next G positions of b(s)'s stream. The position of
every bucket's stream after s steps is therefore G × (the steps before s that drew it), a function of (seed, s,
record counts): the trainer's one global position (s × G examples) still resumes exactly, with any process count.
Checkpoints also store the per-bucket positions, and a resume checks them against the data.

`BucketSampler` flattens this into one stream of record keys (position s × G + r is row r of step s's global batch),
so the pipeline's global offset and per-process slicing (rflow_jax/data/pipeline.py) apply unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import sys

import grain
import numpy as np

# Largest ratio between the pixel counts of two buckets: beyond it steps would differ in cost and token count by more
# than a quarter, which is no longer the one resolution stage the buckets stand for.
MAX_PIXEL_RATIO = 1.25
# Salts that keep the per-step bucket draw and the per-bucket shuffle seeds independent streams of one seed.
_STEP_SALT, _STREAM_SALT = 0x5EED_B0C7_0000_0001, 0x5EED_B0C7_0000_0002
_CHUNK = 1 << 20  # Steps hashed at once when counting a long run's draws (bounded memory).


def sizes(value) -> tuple[tuple[int, int], ...]:
  """data.buckets -> ((height, width), ...); ValueError naming the first entry that is not a pair of positive ints."""
  out = []
  for i, entry in enumerate(value):
    ok = isinstance(entry, (tuple, list)) and len(entry) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in entry)
    if not ok:
      raise ValueError(f"data.buckets[{i}]={entry!r} must be a (height, width) pair of positive integers (pixels)")
    if tuple(entry) in out:
      raise ValueError(f"data.buckets[{i}]={tuple(entry)!r} is listed twice")
    out.append(tuple(entry))
  return tuple(out)


def check(
    value, *, patch_size: int | None = None, pos_embed_max_size: int = 0, factor: int = 1
) -> tuple[tuple[int, int], ...]:
  """The parsed buckets, or ValueError (one line, naming the value) for one the backbone cannot train on.

  factor: pixels per latent cell (the VAE's downsampling; 1 in pixel space): the backbone's patch grid of a bucket is
  (h / factor / patch_size) x (w / ...). patch_size None checks the sizes and pixel counts only: precomputed latents'
  grids are checked when their manifest (which knows the factor) is read.
  """
  buckets = sizes(value)
  cell = factor * (patch_size or 1)
  unit = (
      f"model.patch_size={patch_size}" if factor == 1 else f"the VAE's factor {factor} × model.patch_size={patch_size}"
  )
  for i, (h, w) in enumerate(buckets if patch_size else ()):
    for side in (h, w):
      if side % cell:
        raise ValueError(f"data.buckets[{i}]=({h}, {w}): {side} is not divisible by {unit}")
    if max(h, w) // cell > pos_embed_max_size:
      latents = "" if factor == 1 else f" (its {h // factor}x{w // factor} latents)"
      raise ValueError(
          f"data.buckets[{i}]=({h}, {w}) gives a {h // cell}×{w // cell} patch grid{latents}, larger than "
          f"model.pos_embed_max_size={pos_embed_max_size}"
      )
  if buckets:
    pixels = [h * w for h, w in buckets]
    lo, hi = buckets[int(np.argmin(pixels))], buckets[int(np.argmax(pixels))]
    if max(pixels) > MAX_PIXEL_RATIO * min(pixels):
      raise ValueError(
          f"data.buckets: {hi[0]}x{hi[1]} has {max(pixels)} pixels, {lo[0]}x{lo[1]} {min(pixels)}, more than "
          f"{MAX_PIXEL_RATIO}x apart; buckets of one stage have about equal pixel counts"
      )
  return buckets


def assign(heights, widths, buckets) -> np.ndarray:
  """(N,) int32: the index of the bucket whose aspect ratio is nearest each image's in log space (ties: first)."""
  heights, widths = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
  if heights.size and (heights.min() <= 0 or widths.min() <= 0):
    raise ValueError("image sizes must be positive")
  bucket_log = np.log([w / h for h, w in buckets])  # (K,)
  distance = np.abs(np.log(widths / heights)[:, None] - bucket_log[None, :])  # (N, K)
  return np.argmin(distance, axis=1).astype(np.int32)  # argmin takes the first of equal distances.


def _mix(x) -> np.ndarray:
  """splitmix64 of each uint64 (a bijection with good avalanche): deterministic on every host and numpy version."""
  x = np.atleast_1d(np.asarray(x, np.uint64))
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _u64(x: int) -> np.uint64:
  return np.uint64(int(x) & 0xFFFF_FFFF_FFFF_FFFF)


def step_buckets(seed: int, counts, steps) -> np.ndarray:
  """(len(steps),) int64: the bucket each step draws, with probability counts[b] / sum(counts), from (seed, step).

  Integer arithmetic throughout (a 64-bit hash reduced modulo the record total), so no host rounds differently.
  """
  cumulative = np.cumsum(np.asarray(counts, np.int64)).astype(np.uint64)
  steps = np.asarray(steps, np.int64)
  if cumulative[-1] == 0:
    raise ValueError("no bucket holds a record")
  key = _mix(_u64(seed) ^ np.uint64(_STEP_SALT))
  draws = _mix(key ^ steps.astype(np.uint64)) % cumulative[-1]
  return np.searchsorted(cumulative, draws, side="right").astype(np.int64)


def stream_seed(seed: int, bucket: int) -> int:
  """The shuffle seed of bucket `bucket`'s stream (grain takes a Python int below 2**31)."""
  return int(_mix(_mix(_u64(seed) ^ np.uint64(_STREAM_SALT)) ^ np.uint64(bucket))[0] % np.uint64(1 << 31))


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """The buckets of one run: sizes, the records' assignment, and the per-step draw (seed, global batch).

  Attributes:
    sizes: (height, width) of each bucket, in data.buckets order.
    assignment: (N,) bucket index of each record.
    seed: the run's seed (config.seed).
    global_batch_size: examples per step, all processes together.
  """

  sizes: tuple[tuple[int, int], ...]
  assignment: np.ndarray
  seed: int
  global_batch_size: int

  @functools.cached_property
  def counts(self) -> np.ndarray:
    """(K,) records per bucket; they sum to the number of records."""
    return np.bincount(self.assignment, minlength=len(self.sizes))

  def members(self, bucket: int) -> np.ndarray:
    """The record indices of one bucket, ascending."""
    return np.flatnonzero(self.assignment == bucket)

  def step_buckets(self, steps) -> np.ndarray:
    return step_buckets(self.seed, self.counts, steps)

  def examples_before(self, step: int) -> np.ndarray:
    """(K,) int64: examples each bucket's stream gave to steps 0 .. step - 1 (its position after them)."""
    drawn = np.zeros(len(self.sizes), np.int64)
    for first in range(0, int(step), _CHUNK):
      drawn += np.bincount(self.step_buckets(np.arange(first, min(first + _CHUNK, step))), minlength=len(self.sizes))
    return drawn * self.global_batch_size

  def names(self) -> list[str]:
    return [f"{h}x{w}" for h, w in self.sizes]

  def report(self) -> dict:
    """Records per bucket and the share of steps each is drawn for (the per-bucket counts a run logs at start)."""
    total = int(self.counts.sum())
    return {
        "num_records": total,
        "global_batch_size": self.global_batch_size,
        "buckets": [
            {"height": h, "width": w, "records": int(n), "step_probability": int(n) / total}
            for (h, w), n in zip(self.sizes, self.counts)
        ],
    }

  def metrics(self, step: int) -> dict[str, int]:
    """{"bucket/<h>x<w>_examples": examples drawn from that bucket in steps 1..step} (cumulative)."""
    return {f"bucket/{name}_examples": int(n) for name, n in zip(self.names(), self.examples_before(step))}


class BucketSampler:
  """The run's stream of record keys: position s × G + r is row r of step s's global batch (see the module doc)."""

  def __init__(self, plan: Plan):
    self._plan = plan
    self._members = [plan.members(b) for b in range(len(plan.sizes))]
    self._streams = [
        (
            grain.samplers.IndexSampler(
                num_records=len(m),
                shard_options=grain.sharding.NoSharding(),
                shuffle=True,
                num_epochs=None,  # Each bucket repeats, reshuffled each epoch, for as long as it is drawn.
                seed=stream_seed(plan.seed, b),
            )
            if len(m)
            else None  # Never drawn: its weight is 0.
        )
        for b, m in enumerate(self._members)
    ]
    # Per step (for steps [0, len)): its bucket, and its stream's position before it. Grown on demand; replaced
    # whole, so threads reading it concurrently see an old or a new table, both right.
    self._table = (np.zeros(0, np.int64), np.zeros(0, np.int64))

  def _schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
    table = self._table
    if len(table[0]) < steps:
      n = max(steps, 2 * len(table[0]), 1024)
      drawn = self._plan.step_buckets(np.arange(n))
      starts = np.zeros(n, np.int64)
      for b in range(len(self._members)):
        where = drawn == b
        starts[where] = np.arange(int(where.sum())) * self._plan.global_batch_size
      table = self._table = (drawn, starts)
    return table

  def __len__(self) -> int:
    return sys.maxsize  # Infinite, as grain's IndexSampler with num_epochs=None.

  def __getitem__(self, index: int):
    index = operator.index(index)
    step, row = divmod(index, self._plan.global_batch_size)
    drawn, starts = self._schedule(step + 1)
    bucket = int(drawn[step])
    key = self._members[bucket][self._streams[bucket][int(starts[step]) + row].record_key]
    return grain.RecordMetadata(index=index, record_key=int(key), rng=None)

  def __repr__(self) -> str:  # grain checks repr(sampler) when restoring.
    p = self._plan
    return (
        f"BucketSampler(sizes={p.sizes}, counts={p.counts.tolist()}, seed={p.seed}, "
        f"global_batch_size={p.global_batch_size})"
    )
