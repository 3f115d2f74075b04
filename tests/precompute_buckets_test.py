"""Aspect-ratio buckets on precomputed latents: precompute fits each record to its bucket and encodes it there
(bitwise with any process split), and training draws the same plan from the stored assignment, resuming bitwise."""

import json
import os

import jax
import numpy as np
import pytest

import cli_util
from data_buckets_test import BUCKETS, IMAGES, _metrics, _seen, dataset  # pylint: disable=unused-import (a fixture)
from precompute_test import _config, _save_vae, _train_config
from rflow_jax import config_lib, precompute
from rflow_jax.data import arrayrecord, pixels, precomputed, records
from rflow_jax.export import vae as export_vae
from rflow_jax.train import checkpoint, tasks

# Two buckets keep training to two compiled steps; the tall image then goes to the square bucket (latents 16x16 and
# 12x20 with the tiny VAE's f=2).
SIZES = BUCKETS[:2]
COUNTS = [5, 3]


@pytest.fixture(scope="module")
def inputs(dataset, tmp_path_factory):
  """(the converted images of data_buckets_test, a tiny VAE directory)."""
  return dataset, _save_vae(tmp_path_factory.mktemp("vae") / "vae", seed=0)


def _precompute_config(inputs, **overrides):
  float32 = {"precompute.latent_dtype": "float32", "precompute.text_dtype": "float32"}
  return _config(inputs, **{"data.buckets": SIZES, **float32, **overrides})


@pytest.fixture(scope="module")
def latents(inputs, tmp_path_factory):
  """The bucketed precompute output of one process."""
  out = str(tmp_path_factory.mktemp("latents") / "one")
  job = precompute.build(_precompute_config(inputs), out)
  assert precompute.encode_process(job, 0, 1) == [0, 1, 2]
  precompute.finalize(job)
  return out


def test_each_record_is_its_fitted_image_encoded(inputs, latents):
  manifest = precomputed.load_manifest(latents)
  assert manifest["format_version"] == precomputed.BUCKETED_FORMAT_VERSION
  assert manifest["buckets"]["sizes"] == [list(s) for s in SIZES] and manifest["buckets"]["counts"] == COUNTS
  assert manifest["latent"]["shapes"] == [[16, 16, 4], [12, 20, 4]]
  stored = precomputed.PrecomputedSource(latents)
  source = arrayrecord.ArrayRecordImageSource(inputs[0], 32, SIZES)  # The pixel path's fitting of each record.
  np.testing.assert_array_equal(stored.assignment, source.assignment)
  assert np.bincount(stored.assignment).tolist() == COUNTS
  vae_model, vae_params = export_vae.load_vae(inputs[1])
  for b in range(len(SIZES)):
    members = np.flatnonzero(source.assignment == b)
    images = pixels.to_float(np.stack([source[int(i)]["image"] for i in members]))
    mean, logvar = vae_model.apply({"params": vae_params}, images, method="encode")
    for row, i in enumerate(members):
      h, w = SIZES[b]
      assert stored[int(i)]["latent_mean"].shape == (h // 2, w // 2, 4) and stored[int(i)]["index"] == i
      np.testing.assert_allclose(stored[int(i)]["latent_mean"], mean[row], rtol=0, atol=1e-5)
      np.testing.assert_allclose(stored[int(i)]["latent_logvar"], logvar[row], rtol=0, atol=1e-5)


def test_two_processes_and_a_restart_are_bitwise_one_and_the_buckets_are_in_the_fingerprint(inputs, latents, tmp_path):
  two = str(tmp_path / "two")
  job = precompute.build(_precompute_config(inputs), two)
  assert precompute.encode_process(job, 1, 2) == [1]
  assert precompute.encode_process(job, 0, 2) == [0, 2]
  precompute.finalize(job)
  assert cli_util.dir_bytes(two) == cli_util.dir_bytes(latents)
  # Killed before shard 2's note (its last shard holds both buckets, stored out of index order), with a temporary
  # left: a restart redoes that shard alone, bitwise.
  os.remove(os.path.join(two, "shard-00002-of-00003.json"))
  with open(os.path.join(two, ".latents-00002-of-00003.arrayrecord.tmp-999"), "wb") as f:
    f.write(b"half a shard")
  assert precompute.encode_process(job, 0, 1) == [2]
  precompute.finalize(job)
  assert cli_util.dir_bytes(two) == cli_util.dir_bytes(latents)
  # Other buckets (or none) give every record another shape: no finished shard is kept.
  for buckets in (BUCKETS, ()):
    other = precompute.build(_precompute_config(inputs, **{"data.buckets": buckets}), two)
    assert [precompute.finished_note(other, k) for k in range(3)] == [None] * 3
  with pytest.raises(ValueError, match=r"image size 31x33 is not divisible by the VAE's downsampling factor 2"):
    precompute.build(_precompute_config(inputs, **{"data.buckets": ((32, 32), (31, 33))}), str(tmp_path / "bad"))


def _bucketed_config(inputs, latents, num_steps, **overrides):
  config = _train_config(inputs, latents, **{"data.buckets": SIZES, "model.pos_embed_max_size": 6, **overrides})
  config.train.num_steps, config.ckpt.async_save = num_steps, False
  config.sample.grid_prompts = ("a red circle",)
  return config


def test_mismatched_buckets_and_oversized_grids_are_refused_in_one_line(inputs, latents):
  where = f"data.path={latents!r}"
  config = _bucketed_config(inputs, latents, 3)
  config_lib.validate(config)  # Pixel sizes: the 40-pixel side's grid (40 / 4 = 10 > 6) is not the latent's (5).
  for buckets in (BUCKETS, ()):
    with pytest.raises(records.ManifestError) as e:
      tasks.get_task(_bucketed_config(inputs, latents, 3, **{"data.buckets": buckets}))
    assert str(e.value) == f"{where} holds latents of data.buckets={SIZES!r}, but data.buckets={buckets!r}"
  with pytest.raises(config_lib.ConfigError) as e:
    tasks.get_task(_bucketed_config(inputs, latents, 3, **{"model.pos_embed_max_size": 4}))
  assert str(e.value) == (
      "data.buckets[1]=(24, 40) gives a 3×5 patch grid (its 12x20 latents), larger than model.pos_embed_max_size=4"
  )


@pytest.mark.slow
def test_training_on_bucketed_latents_resumes_bitwise(inputs, latents, tmp_path):
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  # Decoded previews of a precomputed run are precompute_test's; here they would only add a sampler compile per run.
  no_preview = {"train.preview_at_end": False}
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  trainer.train_and_evaluate(_bucketed_config(inputs, latents, 6, **no_preview), straight)
  trainer.train_and_evaluate(_bucketed_config(inputs, latents, 3, **no_preview), stopped)
  first = _seen(stopped)
  trainer.train_and_evaluate(_bucketed_config(inputs, latents, 6, **no_preview), stopped)
  assert _seen(straight) == first + _seen(stopped)  # The same examples, in the same order, at every step.
  for a, b in zip(*(jax.tree.leaves(checkpoint.restore_params(w, use_ema=False)[0]) for w in (straight, stopped))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(straight, "buckets.json")) as f:
    report = json.load(f)
  assert [b["records"] for b in report["buckets"]] == COUNTS and report["num_records"] == len(IMAGES)
  metrics = _metrics(straight)
  assert all(np.isfinite(m["loss"]) for m in metrics) and [m["step"] for m in metrics] == list(range(1, 7))
  plan = tasks.get_task(_bucketed_config(inputs, latents, 6)).buckets
  drawn = plan.step_buckets(np.arange(6))
  assert set(drawn.tolist()) == {0, 1}  # Both compiled steps (16x16 and 12x20 latents) ran.
  for m in metrics:
    assert {k: v for k, v in m.items() if k.startswith("bucket/")} == plan.metrics(m["step"])
  for step, b in enumerate(drawn):
    assert set(_seen(straight)[4 * step : 4 * step + 4]) <= set(plan.members(b).tolist())
