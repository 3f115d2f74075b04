"""Aspect-ratio buckets (data.buckets): assignment, the per-step draw every host agrees on, exact resume, refusals."""

import io
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import debug
from rflow_jax import config_lib
from rflow_jax.data import arrayrecord, buckets, convert, pipeline
from rflow_jax.model import registry as model_registry
from rflow_jax.train import checkpoint, resume, tasks

BUCKETS = ((32, 32), (24, 40), (40, 24))  # 1024, 960 and 960 pixels; patch grids 4x4, 3x5, 5x3.
# (height, width) of the stored images, and the bucket each must land in (nearest aspect ratio in log space).
IMAGES = [((40, 40), 0)] * 4 + [((30, 50), 1), ((36, 64), 1), ((20, 30), 1)] + [((50, 30), 2)]


def _tokenize(text):
  """Dummy byte tokenizer (module level, so it pickles)."""
  return np.frombuffer(text.encode().ljust(8)[:8], np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """IMAGES converted as an image folder: the converted directory."""
  root = tmp_path_factory.mktemp("buckets")
  rng = np.random.default_rng(0)
  lines = []
  os.makedirs(root / "in")
  for i, ((h, w), _) in enumerate(IMAGES):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, format="PNG")
    (root / "in" / f"{i:03d}.png").write_bytes(out.getvalue())
    lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": "a red circle"}) + "\n")
  (root / "in" / "metadata.jsonl").write_text("".join(lines))
  convert.convert(convert.Options("imagefolder", str(root / "in"), str(root / "out"), records_per_shard=3))
  return str(root / "out")


def _plan(source, seed=7, global_batch_size=4):
  return buckets.Plan(sizes=BUCKETS, assignment=source.assignment, seed=seed, global_batch_size=global_batch_size)


def _iterator(source, plan, **overrides):
  kwargs = dict(source=source, tokenize=_tokenize, global_batch_size=plan.global_batch_size, seed=plan.seed, plan=plan)
  kwargs.update({"process_index": 0, "process_count": 1, **overrides})
  return pipeline.make_train_iterator(**kwargs)


def test_records_land_in_the_nearest_bucket_and_the_counts_add_up(dataset):
  source = arrayrecord.ArrayRecordImageSource(dataset, 32, BUCKETS)
  np.testing.assert_array_equal(source.assignment, [b for _, b in IMAGES])
  plan = _plan(source)
  assert plan.counts.tolist() == [4, 3, 1] and plan.counts.sum() == len(source)
  assert [b["records"] for b in plan.report()["buckets"]] == [4, 3, 1]
  assert sum(b["step_probability"] for b in plan.report()["buckets"]) == pytest.approx(1.0)
  for i, (_, b) in enumerate(IMAGES):
    assert source[i]["image"].shape == (*BUCKETS[b], 3)
  # A tie in log space (aspect 2 is as far from 1 as from 4) goes to the bucket listed first, in either order.
  assert buckets.assign([20], [40], [(32, 32), (16, 64)]).tolist() == [0]
  assert buckets.assign([20], [40], [(16, 64), (32, 32)]).tolist() == [0]
  # An empty bucket counts 0 and is never drawn.
  assert buckets.step_buckets(0, [3, 0, 5], np.arange(1000)).tolist().count(1) == 0


def test_the_bucket_of_a_step_depends_only_on_seed_and_step():
  counts = [4, 3, 1]
  run = buckets.step_buckets(7, counts, np.arange(64))
  assert [buckets.step_buckets(7, counts, [s])[0] for s in (40, 3, 63)] == [run[40], run[3], run[63]]
  assert set(run.tolist()) == {0, 1, 2}  # Even the 1-record bucket is drawn.
  assert not np.array_equal(run, buckets.step_buckets(8, counts, np.arange(64)))
  share = np.bincount(buckets.step_buckets(7, counts, np.arange(80_000)), minlength=3) / 80_000
  np.testing.assert_allclose(share, np.array(counts) / 8, atol=0.01)  # Weighted by records: each record alike.


def test_every_process_draws_the_same_bucket_per_step(dataset):
  source = arrayrecord.ArrayRecordImageSource(dataset, 32, BUCKETS)
  plan = _plan(source)
  one = _iterator(source, plan)
  two = [_iterator(source, plan, process_index=p, process_count=2) for p in range(2)]
  drawn = plan.step_buckets(np.arange(12))
  streams = {b: [] for b in range(3)}
  for step in range(12):
    whole, halves = next(one), [next(it) for it in two]
    size = BUCKETS[drawn[step]]
    assert whole["image"].shape == (4, *size, 3)
    assert all(h["image"].shape == (2, *size, 3) for h in halves)
    # The two processes' halves are the one-process global batch, rows in process order.
    np.testing.assert_array_equal(np.concatenate([h["index"] for h in halves]), whole["index"])
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
    assert set(whole["index"].tolist()) <= set(plan.members(drawn[step]).tolist())
    streams[drawn[step]].extend(whole["index"].tolist())
  # Each bucket's stream is a shuffled epoch of its records after another.
  for b, seen in streams.items():
    n = int(plan.counts[b])
    for first in range(0, len(seen) - n + 1, n):
      assert sorted(seen[first : first + n]) == plan.members(b).tolist()
  assert plan.metrics(12) == {
      f"bucket/{h}x{w}_examples": 4 * int((drawn == b).sum()) for b, (h, w) in enumerate(BUCKETS)
  }


@pytest.mark.parametrize("process_count", [1, 2])
def test_the_bucket_stream_resumes_exactly_from_the_global_position(dataset, process_count):
  source = arrayrecord.ArrayRecordImageSource(dataset, 32, BUCKETS)
  plan = _plan(source)
  whole = _iterator(source, plan)
  batches = [next(whole) for _ in range(10)]
  resumed = [  # Stopped after 6 steps of a 1-process run; resumed by `process_count` processes.
      _iterator(source, plan, start=6 * 4, process_index=p, process_count=process_count) for p in range(process_count)
  ]
  for want in batches[6:]:
    got = [next(it) for it in resumed]
    np.testing.assert_array_equal(np.concatenate([g["index"] for g in got]), want["index"])
    np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), want["image"])
  position = resume.data_position(6, 4, plan)
  assert position["bucket_examples"] == (4 * np.bincount(plan.step_buckets(np.arange(6)), minlength=3)).tolist()
  assert resume.start_position(position, 6, 4, plan) == 24
  with pytest.raises(resume.ResumeError, match="the dataset's records or sizes changed"):
    resume.start_position({**position, "bucket_examples": [24, 0, 0]}, 6, 4, plan)


def test_a_non_square_bucket_runs_through_the_mmdit():
  config = debug.get_config()
  config.model.pos_embed_max_size = 6
  model = model_registry.build_model(config)
  x, t, context, pooled = model_registry.dummy_inputs(config)
  # Jitted: one compile each costs about half the CPU of dispatching the model's ops one by one.
  params = jax.jit(model.init)(jax.random.key(0), x, t, context, pooled)
  wide = jax.random.normal(jax.random.key(1), (1, 24, 40, 3))  # A 3x5 patch grid: the table's centre crop.
  out = jax.jit(model.apply)(params, wide, t, context, pooled)
  assert out.shape == (1, 24, 40, 3) and np.isfinite(np.asarray(out)).all()


# Two buckets keep the test to two compiled steps per run; the tall image then goes to the square bucket.
TRAIN_BUCKETS = BUCKETS[:2]


def _train_config(dataset, num_steps):
  config = debug.get_config()
  config.model.pos_embed_max_size = 6
  config.data.name, config.data.path, config.data.buckets = "arrayrecord", dataset, TRAIN_BUCKETS
  config.train.num_steps, config.train.log_every, config.train.checkpoint_every = num_steps, 1, 3
  config.train.record_seen_indices = True
  config.sample.grid_prompts = ("a red circle",)
  config.ckpt.async_save = False
  return config


def _seen(workdir):
  with open(os.path.join(workdir, "seen_indices_p0.json")) as f:
    return json.load(f)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


@pytest.mark.slow
def test_training_on_buckets_resumes_bitwise(dataset, tmp_path):
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  def run(num_steps, workdir):
    config = _train_config(dataset, num_steps)
    # The end-of-run preview samples at the default size, not a bucket's (train_test.py checks it): here it would
    # only add a sampler trace per run.
    config.train.preview_at_end = False
    trainer.train_and_evaluate(config, workdir)

  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  run(6, straight)
  run(3, stopped)
  first = _seen(stopped)
  run(6, stopped)
  assert _seen(straight) == first + _seen(stopped)  # The same examples, in the same order, at every step.
  for a, b in zip(*(jax.tree.leaves(checkpoint.restore_params(w, use_ema=False)[0]) for w in (straight, stopped))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(straight, "buckets.json")) as f:
    report = json.load(f)
  assert [b["records"] for b in report["buckets"]] == [5, 3] and report["num_records"] == len(IMAGES)
  metrics = _metrics(straight)
  losses = lambda ms: {m["step"]: m["loss"] for m in ms}
  assert losses(_metrics(stopped)) == losses(metrics) and sorted(losses(metrics)) == list(range(1, 7))
  assert all(np.isfinite(m["loss"]) for m in metrics)
  plan = tasks.get_task(_train_config(dataset, 6)).buckets
  for m in metrics:  # The logged per-bucket counts are the draws of steps 1..step; they add up to step × batch.
    drawn = {k: v for k, v in m.items() if k.startswith("bucket/")}
    assert drawn == plan.metrics(m["step"]) and sum(drawn.values()) == 4 * m["step"]
  # Rows of the recorded indices are in step order: each step's 4 records come from the bucket that step drew.
  drawn = plan.step_buckets(np.arange(6))
  assert set(drawn.tolist()) == {0, 1}  # Both compiled steps ran.
  for step, b in enumerate(drawn):
    assert set(_seen(straight)[4 * step : 4 * step + 4]) <= set(plan.members(b).tolist())
  manager = checkpoint.make_manager(stopped, read_only=True)
  position = manager.restore(3, args=ocp.args.Composite(position=ocp.args.JsonRestore()))["position"]
  assert position["bucket_examples"] == (4 * np.bincount(drawn[:3], minlength=2)).tolist()


def _bad(**data):
  config = debug.get_config()
  config.data.name, config.data.path = "arrayrecord", "/nonexistent"
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.mark.parametrize(
    "config, message",
    [
        (_bad(buckets=((30, 32),)), "data.buckets[0]=(30, 32): 30 is not divisible by model.patch_size=8"),
        (_bad(buckets=((32, 32), ())), "data.buckets[1]=() must be a (height, width) pair of positive integers"),
        (_bad(buckets=((32, 32), (0, 16))), "data.buckets[1]=(0, 16) must be a (height, width) pair"),
        (_bad(buckets=((32, 32), (16, 64))), "data.buckets[1]=(16, 64) gives a 2×8 patch grid, larger than "),
        (_bad(buckets=((32, 32), (24, 24))), "data.buckets: 32x32 has 1024 pixels, 24x24 576, more than 1.25x apart"),
        (_bad(buckets=((32, 32), (32, 32))), "data.buckets[1]=(32, 32) is listed twice"),
        (_bad(buckets=((32, 32),), name="shapes"), "needs a dataset that stores each record's size"),
    ],
)
def test_bad_buckets_are_refused_in_one_line_before_anything_is_built(config, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value) and "\n" not in str(e.value)
