"""Tests for the grain training pipeline: batches, resume, process sharding."""

import itertools

import numpy as np
import pytest

from rflow_jax.data import pipeline
from rflow_jax.data import shapes

_TOKEN_LEN = 16


def _tokenize(text):
  """Dummy byte tokenizer (module level, so it pickles)."""
  return np.frombuffer(text.encode().ljust(_TOKEN_LEN)[:_TOKEN_LEN], np.uint8).astype(np.int32)


def _iterator(source, **overrides):
  kwargs = dict(source=source, tokenize=_tokenize, global_batch_size=8, seed=7, process_index=0, process_count=1)
  kwargs.update(overrides)
  return pipeline.make_train_iterator(**kwargs)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype
    np.testing.assert_array_equal(a[key], b[key])


def test_batch_contents_match_the_source():
  source = shapes.ShapesSource(seed=1, num_records=64)
  batch = next(_iterator(source))
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (8, _TOKEN_LEN)
  assert batch["tokens"].dtype == np.int32
  assert batch["index"].shape == (8,) and batch["index"].dtype == np.int64
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  for row, index in enumerate(batch["index"]):
    record = source[int(index)]
    np.testing.assert_allclose(batch["image"][row], record["image"] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(batch["tokens"][row], _tokenize(record["caption"]))


def test_stream_is_shuffled_and_seeded():
  source = shapes.ShapesSource(num_records=64)
  first = next(_iterator(source, seed=1))["index"]
  assert not np.array_equal(first, np.arange(8))
  np.testing.assert_array_equal(first, next(_iterator(source, seed=1))["index"])
  assert not np.array_equal(first, next(_iterator(source, seed=2))["index"])


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_state_restores_the_exact_stream(process_index, process_count):
  source = shapes.ShapesSource(seed=2, num_records=50)
  shard = dict(process_index=process_index, process_count=process_count)
  it = _iterator(source, **shard)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = _iterator(source, **shard)
  resumed.set_state(state)
  for want in expected:
    _assert_batches_equal(next(resumed), want)


def test_two_processes_split_one_epoch_exactly():
  source = shapes.ShapesSource(seed=3, num_records=40)
  seen = []
  for process_index in range(2):
    it = _iterator(source, process_index=process_index, process_count=2, num_epochs=1)
    batches = list(it)
    assert len(batches) == 5  # 20 records per process, local batch 4.
    assert all(b["image"].shape[0] == 4 for b in batches)
    seen.append(np.concatenate([b["index"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(40))


def test_global_batch_does_not_depend_on_process_count():
  # Process p takes positions p, p + P, ... of one shuffled stream, so step
  # k's global batch is the same records for any number of processes.
  source = shapes.ShapesSource(seed=4, num_records=64)
  single = _iterator(source)
  split = [_iterator(source, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    together = set(next(single)["index"].tolist())
    apart = set(itertools.chain.from_iterable(next(it)["index"].tolist() for it in split))
    assert together == apart


def test_bad_batch_or_process_arguments_rejected():
  source = shapes.ShapesSource(num_records=16)
  with pytest.raises(ValueError, match="7"):
    _iterator(source, global_batch_size=7, process_count=2)
  with pytest.raises(ValueError, match="2"):
    _iterator(source, process_index=2, process_count=2)


def test_transform_rejects_float_images_and_bad_tokens():
  to_example = pipeline.ToTrainingExample(_tokenize)
  with pytest.raises(ValueError, match="float32"):
    to_example.map({"image": np.zeros((4, 4, 3), np.float32), "caption": "x"})
  bad = pipeline.ToTrainingExample(lambda s: np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match="'x'"):
    bad.map({"image": np.zeros((4, 4, 3), np.uint8), "caption": "x"})


def test_make_eval_batch():
  prompts = shapes.eval_prompts(2, seed=0)
  batch = pipeline.make_eval_batch(prompts, _tokenize)
  assert batch["tokens"].shape == (6, _TOKEN_LEN)
  assert batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["tokens"][3], _tokenize(prompts[3]))
  with pytest.raises(ValueError, match="at least one"):
    pipeline.make_eval_batch([], _tokenize)
  ragged = lambda s: np.arange(len(s), dtype=np.int32)
  with pytest.raises(ValueError, match="fixed length"):
    pipeline.make_eval_batch(["a", "bb"], ragged)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_a_global_start_position_resumes_the_stream_for_any_process_count(process_count):
  # Elastic resume: 3 global batches consumed by 1 process; P processes
  # started at position 3 * 8 continue with exactly the stream's batch 3, 4.
  source = shapes.ShapesSource(seed=4, num_records=20)  # Crosses an epoch.
  single = _iterator(source)
  for _ in range(3):
    next(single)
  resumed = [_iterator(source, process_index=p, process_count=process_count, start=3 * 8) for p in range(process_count)]
  for _ in range(2):
    expected = next(single)["index"].tolist()
    got = [i for it in resumed for i in next(it)["index"].tolist()]
    assert got == expected
  with pytest.raises(ValueError, match="start=5 must be a non-negative"):
    _iterator(source, start=5)
