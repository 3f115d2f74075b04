"""python -m rflow_jax.precompute and data.name="precomputed": bitwise resume and process-count independence, the
training batch against the in-step path, and the manifest check's refusals."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import cli_util
from configs import debug, shapes_vae
from rflow_jax import precompute, rundir
from rflow_jax.data import arrayrecord, convert, pixels, precomputed, records, shapes
from rflow_jax.export import vae as export_vae
from rflow_jax.model import text_encoders, vae as vae_lib
from rflow_jax.train import step as step_lib, tasks, trainer, vae_task

IMAGE_SIZE = 32  # Pixels; the tiny VAE (f=2) makes 16x16x4 latents.


def _save_vae(directory, seed, scaling_factor=0.7, shift_factor=0.1):
  model = vae_task.build_model(shapes_vae.get_config("tiny")).clone(
      scaling_factor=scaling_factor, shift_factor=shift_factor
  )
  params = model.init(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))["params"]
  export_vae.save_vae(params, model, directory)
  return str(directory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """(converted dataset of 10 shapes images in 4 shards, a tiny VAE directory)."""
  root = tmp_path_factory.mktemp("precompute")
  source = shapes.ShapesSource(size=IMAGE_SIZE, seed=0, num_records=10, caption_style="sentence")
  os.makedirs(root / "in")
  lines = []
  for i in range(len(source)):
    Image.fromarray(source[i]["image"]).save(root / "in" / f"{i:03d}.png")
    lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": source[i]["caption"]}) + "\n")
  (root / "in" / "metadata.jsonl").write_text("".join(lines))
  convert.convert(convert.Options("imagefolder", str(root / "in"), str(root / "converted"), records_per_shard=3))
  return str(root / "converted"), _save_vae(root / "vae", seed=0)


def _config(inputs, **overrides):
  c = debug.get_config()
  c.data.name, c.data.path, c.data.image_size = "arrayrecord", inputs[0], IMAGE_SIZE
  c.vae.path = inputs[1]
  c.precompute.batch_size = 2
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def _one_process(config, out):
  job = precompute.build(config, out)
  assert precompute.encode_process(job, 0, 1) == [0, 1, 2, 3]
  precompute.finalize(job)
  return cli_util.dir_bytes(out)


@pytest.fixture(scope="module")
def default_latents(inputs, tmp_path_factory):
  """(directory, its bytes): one process's precompute of `inputs` with the default config (float16 storage); the
  tests below only read it."""
  out = str(tmp_path_factory.mktemp("default") / "one")
  return out, _one_process(_config(inputs), out)


def test_two_processes_and_a_killed_restart_are_bitwise_one_run(inputs, default_latents, tmp_path, monkeypatch):
  config = _config(inputs)
  reference = default_latents[1]
  assert not [n for n in reference if n.startswith(".")]  # No temporaries left.
  # Two processes, each with its own slice of the shards (simulated: the per-process function, one after the other).
  two = str(tmp_path / "two")
  job = precompute.build(config, two)
  assert precompute.encode_process(job, 1, 2) == [1, 3]
  with pytest.raises(records.ManifestError, match=r"shard 0 of 4 is not finished in .*: run precompute again"):
    precompute.finalize(job)
  assert precompute.encode_process(job, 0, 2) == [0, 2]
  precompute.finalize(job)
  assert cli_util.dir_bytes(two) == reference
  # Killed while writing the third shard: a dead process's temporary is left, no note, no manifest.
  killed = str(tmp_path / "killed")
  commit, commits = precomputed.ShardWriter.commit, []

  def dies_at_fifth_commit(writer):
    commits.append(writer.path)
    if len(commits) == 5:
      with open(os.path.join(killed, ".latents-00002-of-00004.arrayrecord.tmp-999"), "wb") as f:
        f.write(b"half a shard")
      raise KeyboardInterrupt("killed")
    return commit(writer)

  monkeypatch.setattr(precomputed.ShardWriter, "commit", dies_at_fifth_commit)
  with pytest.raises(KeyboardInterrupt):
    precompute.encode_process(precompute.build(config, killed), 0, 1)
  monkeypatch.setattr(precomputed.ShardWriter, "commit", commit)
  assert ".latents-00002-of-00004.arrayrecord.tmp-999" in os.listdir(killed)
  assert "shard-00002-of-00004.json" not in os.listdir(killed)
  assert "manifest.json" not in os.listdir(killed)
  # A finished shard damaged since is redone too.
  with open(os.path.join(killed, "text-00001-of-00004.arrayrecord"), "r+b") as f:
    f.seek(40)
    f.write(b"\xff\xfe")
  job = precompute.build(config, killed)
  assert precompute.encode_process(job, 0, 1) == [1, 2, 3]  # Shard 0 is kept.
  precompute.finalize(job)
  assert cli_util.dir_bytes(killed) == reference
  # Another storage dtype changes every shard's fingerprint: nothing is kept.
  job = precompute.build(_config(inputs, **{"precompute.latent_dtype": "bfloat16"}), killed)
  assert precompute.encode_process(job, 0, 1) == [0, 1, 2, 3]


def _train_config(inputs, path, **overrides):
  c = debug.get_config()
  c.data.name, c.data.path, c.data.image_size = "precomputed", path, IMAGE_SIZE // 2
  c.model.in_channels, c.model.patch_size = 4, 4
  c.vae.path = inputs[1]
  c.text.drop_prob = 0.5
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 3, 1, 3
  c.train.evaluators, c.train.record_seen_indices = (), True
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def test_training_batch_equals_the_in_step_path_and_trains(inputs, tmp_path):
  out = str(tmp_path / "latents")
  precompute.run(_config(inputs, **{"precompute.latent_dtype": "float32", "precompute.text_dtype": "float32"}), out)
  config = _train_config(inputs, out)
  task = tasks.get_task(config)
  batch = next(task.make_iterator(0, 1))
  assert set(batch) == {"latent_mean", "latent_logvar", "text_0", "text_1", "text_2", "index"}
  key = jax.random.key(5)
  x0, context, pooled = step_lib.stored_inputs(batch, key, task.latents.stored_inputs(), config.text.drop_prob)
  # The in-step path: encode the same records' images and captions now.
  source = arrayrecord.ArrayRecordImageSource(inputs[0], IMAGE_SIZE)
  items = [source[int(i)] for i in batch["index"]]
  vae_model, vae_params = export_vae.load_vae(inputs[1])
  mean, logvar = vae_model.apply(
      {"params": vae_params}, pixels.to_float(np.stack([x["image"] for x in items])), method="encode"
  )
  latent = vae_lib.sample_posterior(mean, logvar, jax.random.fold_in(key, step_lib.LATENT_NOISE_STREAM))
  expected_x0 = vae_lib.normalize_latents(latent, 0.7, 0.1)
  np.testing.assert_allclose(x0, expected_x0, rtol=0, atol=1e-5)
  tokens = jnp.asarray(task.tokenizer.batch([x["caption"] for x in items]))
  text_params = text_encoders.init_params(task.text_stack, config.text)
  k_drop = jax.random.split(key)[0]
  expected_context, expected_pooled = step_lib.condition(
      task.text_stack, text_params, tokens, k_drop, config.text.drop_prob
  )
  np.testing.assert_allclose(context, expected_context, rtol=0, atol=1e-5)  # Stored float32: encoder rounding only.
  np.testing.assert_allclose(pooled, expected_pooled, rtol=0, atol=1e-5)
  # text.drop_to="empty": a dropped encoder gives the empty prompt's outputs (stored once), in both paths alike.
  config.text.drop_to = "empty"
  task = tasks.get_task(config)
  empty_tokens = text_encoders.drop_tokens(config.text, task.tokenizer)
  for p in (0.5, 1.0):
    _, context, pooled = step_lib.stored_inputs(batch, key, task.latents.stored_inputs(), p)
    expected = step_lib.condition(task.text_stack, text_params, tokens, k_drop, p, empty_tokens)
    np.testing.assert_allclose(context, expected[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(pooled, expected[1], rtol=0, atol=1e-5)
  empty = text_encoders.drop_and_compose(
      text_encoders.empty_outputs(task.text_stack, text_params, empty_tokens), None, 0.0
  )
  np.testing.assert_allclose(context, jnp.broadcast_to(empty[0], context.shape), rtol=0, atol=1e-5)  # p = 1.
  assert float(jnp.abs(empty[0]).max()) > 0.1  # Not zeros.
  # Three steps on the precomputed records (drop_to="empty"), the second one's latents poisoned (NaN) and dropped by
  # the guard; the preview decodes the sampled latents with the VAE.
  config.train.poison_step, config.train.nonfinite = 2, "skip"
  results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 3 and np.isfinite(results["loss"]) and results["skipped_steps"] == 1
  grids = os.listdir(tmp_path / "run" / "samples")
  assert grids == ["grid_000003.png"]
  assert Image.open(tmp_path / "run" / "samples" / grids[0]).size[1] == IMAGE_SIZE + 4  # Decoded: pixel size.
  sampler, params, text_params, _, _ = rundir.load_sampler(str(tmp_path / "run"))  # The sample CLI's path.
  assert sampler.generate(params, text_params, ["a red circle"], seed=0).shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
  with open(tmp_path / "run" / "seen_indices_p0.json") as f:
    seen = json.load(f)
  assert len(seen) == 12 and sorted(seen[:10]) == list(range(10))  # One globally shuffled epoch, then the next.


def test_sd3_stack_embeddings_and_empty_prompt_dropout(inputs, tmp_path):
  sd3 = {"text.encoders": "sd3", "text.t5_length": 8, "text.drop_to": "empty"}
  out = str(tmp_path / "sd3")
  precompute.run(_config(inputs, **sd3, **{"precompute.text_dtype": "float32"}), out)
  config = _train_config(inputs, out, **sd3, **{"vae.path": ""})  # "": the VAE the manifest names.
  task = tasks.get_task(config)
  batch = next(task.make_iterator(0, 1))
  key = jax.random.key(3)
  _, context, pooled = step_lib.stored_inputs(batch, key, task.latents.stored_inputs(), 0.5)
  captions = [arrayrecord.ArrayRecordImageSource(inputs[0], IMAGE_SIZE)[int(i)]["caption"] for i in batch["index"]]
  text_params = text_encoders.init_params(task.text_stack, config.text)
  expected = step_lib.condition(
      task.text_stack,
      text_params,
      jnp.asarray(task.tokenizer.batch(captions)),
      jax.random.split(key)[0],
      0.5,
      text_encoders.drop_tokens(config.text, task.tokenizer),
  )
  np.testing.assert_allclose(context, expected[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(pooled, expected[1], rtol=0, atol=1e-5)


def test_half_precision_storage_stays_close(inputs, default_latents):
  out = default_latents[0]  # Defaults: float16 moments and embeddings.
  stored = precomputed.PrecomputedSource(out)
  source = arrayrecord.ArrayRecordImageSource(inputs[0], IMAGE_SIZE)
  vae_model, vae_params = export_vae.load_vae(inputs[1])
  mean, logvar = vae_model.apply({"params": vae_params}, pixels.to_float(source[7]["image"][None]), method="encode")
  assert stored[7]["latent_mean"].dtype == np.float16
  np.testing.assert_allclose(stored[7]["latent_mean"].astype(np.float32), mean[0], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(stored[7]["latent_logvar"].astype(np.float32), logvar[0], rtol=1e-3, atol=1e-3)


def test_mismatches_are_refused_in_one_line(inputs, default_latents, tmp_path):
  out = default_latents[0]
  vae_id = precomputed.load_manifest(out)["vae"]["identity"][:12]
  with pytest.raises(records.ManifestError) as e:
    tasks.get_task(_train_config(inputs, out, **{"model.in_channels": 8}))
  assert str(e.value) == f"data.path={out!r} holds latents of 4 channels, but model.in_channels=8"
  with pytest.raises(records.ManifestError) as e:
    tasks.get_task(_train_config(inputs, out, **{"data.image_size": 32, "model.patch_size": 8}))
  assert str(e.value) == (
      f"data.path={out!r} holds 16x16 latents, but data.image_size=32 (with "
      'data.name="precomputed" it is the latent side the MM-DiT reads)'
  )
  with pytest.raises(records.ManifestError) as e:
    tasks.get_task(_train_config(inputs, out, **{"text.width": 32}))
  assert str(e.value) == (
      f"data.path={out!r} holds text embeddings of context_width=16, but config.text gives " "context_width=32"
  )
  other = _save_vae(tmp_path / "other_vae", seed=1)
  with pytest.raises(records.ManifestError) as e:
    tasks.get_task(_train_config(inputs, out, **{"vae.path": other}))
  other_id = precompute.latent_data.vae_identity(*export_vae.load_vae(other))[:12]
  assert str(e.value) == (
      f"data.path={out!r} was encoded by VAE {vae_id} ({inputs[1]}), but vae.path={other!r} " f"is VAE {other_id}"
  )
  # The same weights with other latent factors (latent_stats run afterwards) are the same VAE, and its factors apply.
  refactored = str(tmp_path / "refactored_vae")
  shutil.copytree(inputs[1], refactored)
  export_vae.set_latent_factors(refactored, 0.5, 0.25)
  stored = tasks.get_task(_train_config(inputs, out, **{"vae.path": refactored})).latents.stored_inputs()
  assert (stored.scaling_factor, stored.shift_factor) == (0.5, 0.25)
  with pytest.raises(records.ManifestError, match="text encoders"):
    tasks.get_task(_train_config(inputs, out, **{"text.init_seed": 7}))


def test_bad_precompute_input_fails_before_work(inputs, tmp_path):
  with pytest.raises(ValueError, match=r"data.name='shapes', data.path='': precompute reads a converted dataset"):
    precompute.build(_config(inputs, **{"data.name": "shapes", "data.path": ""}), str(tmp_path))
  with pytest.raises(ValueError, match=r"^precompute.latent_dtype='int8'; valid: \['bfloat16', 'float16', "):
    precompute.build(_config(inputs, **{"precompute.latent_dtype": "int8"}), str(tmp_path))
  with pytest.raises(ValueError, match="image size 31x31 is not divisible by the VAE's downsampling factor 2"):
    precompute.build(_config(inputs, **{"data.image_size": 31}), str(tmp_path))
  with pytest.raises(ValueError, match="vae.path is empty"):
    precompute.build(_config(inputs, **{"vae.path": ""}), str(tmp_path))


@pytest.mark.slow
def test_command_line(inputs, tmp_path):
  flags = [
      "--config.data.name=arrayrecord",
      f"--config.data.path={inputs[0]}",
      f"--config.vae.path={inputs[1]}",
      "--config.precompute.batch_size=4",
  ]
  rc, _, stderr = cli_util.run_module(
      "rflow_jax.precompute",
      "--config=configs/debug.py",
      f"--out={tmp_path}",
      "--config.precompute.text_dtype=int8",
      *flags,
  )
  cli_util.assert_one_line_error(rc, stderr, "precompute.text_dtype='int8'; valid: ['bfloat16', 'float16', 'float32']")
  rc, stdout, stderr = cli_util.run_module(
      "rflow_jax.precompute", "--config=configs/debug.py", f"--out={tmp_path}", *flags
  )
  assert rc == 0, stderr[-2000:]
  line = json.loads(stdout.strip().splitlines()[-1])
  assert line["num_records"] == 10 and line["latent"] == {"shape": [16, 16, 4], "dtype": "float16"}
  assert len(precomputed.PrecomputedSource(str(tmp_path))) == 10
