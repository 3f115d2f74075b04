"""Per-process grain input pipeline: records -> checkpointable batch iterator.

`make_train_iterator` wires a random-access source (e.g. `shapes.ShapesSource`)
into grain's DataLoader:

  IndexSampler(global shuffle, seed, num_epochs)      one stream for all hosts
    -> DataLoader shard_options (process_index / process_count)
    -> ToTrainingExample (uint8 image -> float32 [-1, 1], caption -> tokens)
    -> Batch(global_batch_size // process_count, drop_remainder=True)

Sharding happens in the DataLoader over one globally shuffled stream: with
P > 1 processes, `ContiguousShardSampler` makes process p's step-k batch the
positions [k * G + p * B, k * G + (p + 1) * B) of that stream (G = global
batch, B = G / P). Hence the union of all processes' step-k batches is exactly
the positions [k * G, (k + 1) * G), whatever P is, and within one epoch every
record is seen exactly once across processes. Because the trainer's global
array stacks the processes' local batches in process order, row r of the
global batch is stream position k * G + r for any P: a 2-process run trains
on exactly the batches of a 1-process run (tests/multiprocess_test.py).

The stream's position is global: `start` (examples of the one shuffled
stream already consumed, a multiple of the global batch) makes a fresh
iterator begin at position `start` for any process count, which is how the
trainer resumes, also with another number of processes than the run that
saved it (rflow_jax/train/resume.py). The returned `grain.DataLoaderIterator`
is also checkpointable the grain way (`get_state` / `set_state`, per process).

Aspect-ratio buckets (`plan`, rflow_jax/data/buckets.py) replace the one shuffled stream by buckets.BucketSampler,
a stream whose global batch k is G positions of the bucket step k draws: the offset and the per-process slicing
above apply to it unchanged, so every process's step-k batch comes from the same bucket.

Worker processes (`worker_count > 0`) pickle the source and `tokenize`, so both
must be picklable (module-level functions or plain objects, no lambdas), and
grain reads its configuration from absl flags, so the program must have parsed
them (absl `app.run` does). Tests use `worker_count=0`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from rflow_jax.data import buckets, pixels

Tokenize = Callable[[str], np.ndarray]


class ToTrainingExample(grain.transforms.Map):
  """Turns a record {image: uint8, caption: str, ...} into model inputs.

  Output: image float32 (S, S, 3) in [-1, 1]; tokens int32 (L,) from
  `tokenize(caption)`; and, if the record has one, its `index` as int64
  (lets tests check sharding and the trainer log which records it saw).
  """

  def __init__(self, tokenize: Tokenize):
    self._tokenize = tokenize

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(element["image"])
    if image.dtype != np.uint8 or image.ndim != 3:
      raise ValueError(f"expected an (H, W, C) uint8 image; got dtype {image.dtype} and " f"shape {image.shape}")
    example = {
        # uint8 [0, 255] -> [-1, 1]: the data end of the flow path (t = 0).
        "image": pixels.to_float(image),
        "tokens": _tokens(self._tokenize, element["caption"]),
    }
    if "index" in element:
      example["index"] = np.int64(element["index"])
    return example


class ContiguousShardSampler:
  """Reorders a sampler so that process p reads contiguous blocks of each global batch.

  grain's DataLoader hands shard p the positions p, p + P, p + 2P, ... of its
  sampler. This wrapper maps shard position i = p + P * (k * B + j) to
  k * G + p * B + j, so process p's k-th local batch (B consecutive reads) is
  the p-th block of the k-th global batch.
  """

  def __init__(self, sampler, local_batch_size: int, process_count: int):
    self._sampler = sampler
    self._b = local_batch_size
    self._p = process_count

  def __len__(self) -> int:
    return len(self._sampler)

  def __getitem__(self, index: int):
    process, m = index % self._p, index // self._p
    k, j = divmod(m, self._b)
    return self._sampler[k * self._b * self._p + process * self._b + j]

  def __repr__(self) -> str:  # grain checks repr(sampler) when restoring.
    return f"ContiguousShardSampler({self._sampler!r}, local_batch_size={self._b}, " f"process_count={self._p})"


class OffsetSampler:
  """The positions start, start + 1, ... of a sampler: the global stream resumed at position `start`."""

  def __init__(self, sampler, start: int):
    self._sampler = sampler
    self._start = start

  def __len__(self) -> int:
    return len(self._sampler) - self._start

  def __getitem__(self, index: int):
    return self._sampler[self._start + index]

  def __repr__(self) -> str:  # grain checks repr(sampler) when restoring.
    return f"OffsetSampler({self._sampler!r}, start={self._start})"


def _tokens(tokenize: Tokenize, text: str) -> np.ndarray:
  tokens = np.asarray(tokenize(text))
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
        f"tokenize({text!r}) must return a 1-D integer array; got dtype " f"{tokens.dtype} and shape {tokens.shape}"
    )
  return tokens.astype(np.int32)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """The per-process batch size; raises if the global batch does not split.

  Args:
    global_batch_size: batch size summed over all processes.
    process_count: number of JAX processes.

  Returns:
    global_batch_size // process_count.
  """
  if process_count <= 0:
    raise ValueError(f"process_count must be positive; got {process_count!r}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size must be a positive multiple of process_count=" f"{process_count}; got {global_batch_size!r}"
    )
  return global_batch_size // process_count


def make_train_iterator(
    *,
    source: grain.sources.RandomAccessDataSource,
    tokenize: Tokenize | None,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    worker_count: int = 0,
    num_epochs: int | None = None,
    num_threads: int = 1,
    prefetch_buffer_size: int | None = None,
    start: int = 0,
    plan: buckets.Plan | None = None,
) -> grain.DataLoaderIterator:
  """Builds this process's shuffled, sharded, batched training iterator.

  Args:
    source: random-access source of {image: uint8 (S, S, 3), caption: str,
      optional index} records.
    tokenize: picklable `caption -> int array (L,)`; L must not vary. None: the records are already model inputs
      (dicts of fixed-shape arrays, e.g. precomputed latents and embeddings) and are only batched.
    global_batch_size: batch size summed over processes; must be divisible by
      `process_count`.
    seed: shuffle seed (non-negative, < 2**32).
    process_index: this process's index in [0, process_count).
    process_count: number of processes sharing the stream.
    worker_count: grain worker processes (0 = generate in this process).
    num_epochs: passes over the source; None repeats forever.
    num_threads: grain read threads per process. Generation is Python- and
      GIL-bound, so more threads buy little; use workers to scale.
    prefetch_buffer_size: records read ahead per process; default two local
      batches.
    start: global stream position to begin at (examples all processes
      consumed before); a multiple of global_batch_size.
    plan: aspect-ratio buckets (the source serves record i at its bucket's size); None: one shuffled stream.

  Returns:
    A checkpointable iterator of dicts with image float32 (B, S, S, 3) in
    [-1, 1] (with a plan: (B, h, w, 3), h x w the size of the step's bucket),
    tokens int32 (B, L) and, if the source provides it, index int64 (B,),
    where B = global_batch_size // process_count.
  """
  batch_size = local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}); got " f"{process_index!r}")
  if start < 0 or start % global_batch_size:
    raise ValueError(f"start={start!r} must be a non-negative multiple of global_batch_size={global_batch_size}")
  if plan is not None:
    if plan.global_batch_size != global_batch_size or plan.seed != seed or len(plan.assignment) != len(source):
      raise ValueError(
          f"the bucket plan (global batch {plan.global_batch_size}, seed {plan.seed}, {len(plan.assignment)} "
          f"records) is not this stream's (global batch {global_batch_size}, seed {seed}, {len(source)} records)"
      )
    if num_epochs is not None:
      raise ValueError("aspect-ratio buckets repeat each bucket's records for as long as it is drawn: num_epochs=None")
    sampler = buckets.BucketSampler(plan)
  else:
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.NoSharding(),  # The DataLoader shards.
        shuffle=True,
        num_epochs=num_epochs,
        seed=int(seed),  # grain insists on a Python int (not np.int64).
    )
  if start:  # Before the process split: the offset is global, so any process count resumes the same stream.
    sampler = OffsetSampler(sampler, start)
  if process_count > 1:  # One process keeps the plain sampler (and its checkpointed repr).
    sampler = ContiguousShardSampler(sampler, batch_size, process_count)
  shard_options = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size or 2 * batch_size)
  loader = grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=([ToTrainingExample(tokenize)] if tokenize is not None else [])
      + [grain.transforms.Batch(batch_size, drop_remainder=True)],
      worker_count=worker_count,
      shard_options=shard_options,
      read_options=read_options,
  )
  return iter(loader)


def make_eval_batch(prompts: Sequence[str], tokenize: Tokenize) -> dict[str, np.ndarray]:
  """Tokenizes sampling prompts into one batch.

  Args:
    prompts: prompt strings.
    tokenize: `text -> int array (L,)`, the same as in training.

  Returns:
    {"tokens": int32 (N, L)}.
  """
  if not prompts:
    raise ValueError("make_eval_batch needs at least one prompt; got none")
  tokens = [_tokens(tokenize, p) for p in prompts]
  lengths = sorted({len(t) for t in tokens})
  if len(lengths) > 1:
    raise ValueError(f"tokenize must return one fixed length; got lengths {lengths}")
  return {"tokens": np.stack(tokens)}
