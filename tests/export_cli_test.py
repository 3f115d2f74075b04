"""`python -m rflow_jax.export` end to end: a 2-step debug run exported, loaded by diffusers, and sampled again.

The diffusers export is checked against diffusers itself: SD3Transformer2DModel.from_pretrained(OUT/transformer)
and our MMDiT with the checkpoint's EMA params get the same random inputs (NCHW, timestep 1000·t).
"""

import json
import os

import flax
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
from configs import debug
from rflow_jax import rundir
from rflow_jax.export import workdir as export_workdir
from rflow_jax.model import mmdit
from rflow_jax.model import registry
from rflow_jax.train import checkpoint, trainer

pytestmark = pytest.mark.slow
# max |ours - diffusers| / max |diffusers| in float32.
PARITY_RTOL = 1e-5
_run, _assert_one_line_error, _main_error = cli_util.run_module, cli_util.assert_one_line_error, cli_util.main_error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, config, diffusers export dir) of a 2-step debug run with a non-trivial sampling shift."""
  workdir = tmp_path_factory.mktemp("run")
  config = debug.get_config()
  config.train.num_steps = 2
  config.sample.shift = 3.0
  trainer.train_and_evaluate(config, str(workdir))
  out = tmp_path_factory.mktemp("export") / "diffusers"
  rc, stdout, stderr = _run("rflow_jax.export", f"--workdir={workdir}", f"--out={out}")
  assert rc == 0, stderr[-3000:]
  assert "wrote diffusers export of checkpoint step 2 (ema params)" in stdout
  return workdir, config, out


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.linen.unbox(tree), sep="/")


def test_diffusers_export_matches_our_model(run):
  workdir, config, out = run
  assert sorted(os.listdir(out)) == ["rflow_jax_export.json", "scheduler", "transformer"]
  ref = SD3Transformer2DModel.from_pretrained(out / "transformer").eval()
  assert ref.config.in_channels == 3 and ref.config.joint_attention_dim == config.text.width

  params, _, step = checkpoint.restore_params(str(workdir), use_ema=True)
  assert step == 2
  model = mmdit.MMDiT(**registry.model_kwargs(config))
  rng = np.random.RandomState(0)
  b, s = 3, config.data.image_size
  x = rng.randn(b, s, s, 3).astype(np.float32)
  t = rng.uniform(0.05, 0.95, size=(b,)).astype(np.float32)
  ctx = rng.randn(b, 2 * config.text.max_length, config.text.width).astype(np.float32)
  pooled = rng.randn(b, config.text.width).astype(np.float32)
  ours = np.asarray(model.apply({"params": params}, x, t, ctx, pooled))
  with torch.no_grad():
    theirs = (
        ref(
            hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t) * 1000.0,
        )
        .sample.numpy()
        .transpose(0, 2, 3, 1)
    )
  scale = float(np.abs(theirs).max())
  err = float(np.abs(ours - theirs).max()) / scale
  print(
      f"debug run, step 2, EMA params: max|ours - diffusers| / max|diffusers| = {err:.2e} (max|diffusers| = "
      f"{scale:.3e})"
  )
  assert scale > 1e-4  # Two updates moved the zero-initialised output layer: the check is not 0 == 0.
  assert err <= PARITY_RTOL


def test_scheduler_config_and_export_info(run):
  workdir, config, out = run
  scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
  assert scheduler.config.shift == 3.0 and scheduler.config.num_train_timesteps == 1000
  assert not scheduler.config.use_dynamic_shifting
  info = json.loads((out / "rflow_jax_export.json").read_text())
  assert info["step"] == 2 and info["params"] == "ema" and info["format"] == "diffusers"
  assert info["sample"]["shift"] == 3.0 and info["workdir"] == str(workdir.resolve())
  assert info["arch"] == "mmdit"
  assert export_workdir.model_from_config(info["arch"], info["model"]) == mmdit.MMDiT(**registry.model_kwargs(config))


@pytest.mark.parametrize("which", ["raw", "ema"])
def test_safetensors_export_roundtrips_bitwise(run, tmp_path, which):
  """raw through the CLI (its --format and --params flags reach the export); ema, the CLI's default params (launched
  by the `run` fixture), through the function behind it."""
  workdir, config, _ = run
  out = tmp_path / "flat"
  if which == "raw":
    rc, _, stderr = _run(
        "rflow_jax.export", f"--workdir={workdir}", f"--out={out}", "--format=safetensors", f"--params={which}"
    )
    assert rc == 0, stderr[-3000:]
  else:
    info = export_workdir.export_workdir(workdir, out, fmt="safetensors", params=which)
    assert info["params"] == which and info["format"] == "safetensors"
  assert sorted(os.listdir(out)) == ["params.safetensors", "rflow_jax_export.json"]
  saved = safetensors.numpy.load_file(str(out / "params.safetensors"))
  expected = _flat(checkpoint.restore_params(str(workdir), use_ema=which == "ema")[0])
  assert set(saved) == set(expected) and "blocks_0/x/attn/qkv/kernel" in saved
  for name, value in expected.items():
    value = np.asarray(value)
    assert saved[name].dtype == value.dtype and saved[name].shape == value.shape, name
    np.testing.assert_array_equal(saved[name], value, err_msg=name)
  model, params, info = export_workdir.load_flat(out)
  assert info["params"] == which and model == mmdit.MMDiT(**registry.model_kwargs(config))
  assert set(_flat(params)) == set(expected)


def test_export_errors_are_one_line(run, tmp_path):
  """Launched: a bad flag value (absl's parse) and an error of the export itself given --overwrite. The other user
  errors come from the same export_workdir call, here in this process through main's error handling."""
  workdir, _, out = run
  export = export_workdir.export_workdir
  rc, stderr = _main_error(lambda: export(tmp_path / "nowhere", tmp_path / "o1"))
  _assert_one_line_error(rc, stderr, "nowhere", "is not a directory")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  rc, stderr = _main_error(lambda: export(empty, tmp_path / "o2"))
  _assert_one_line_error(rc, stderr, "no checkpoint in")
  assert not (tmp_path / "o2").exists()
  before = sorted(os.listdir(out / "transformer"))
  rc, stderr = _main_error(lambda: export(workdir, out))
  _assert_one_line_error(rc, stderr, "exists and is not empty", "--overwrite")
  assert sorted(os.listdir(out / "transformer")) == before
  rc, _, stderr = _run("rflow_jax.export", f"--workdir={workdir}", f"--out={workdir.parent}", "--overwrite")
  _assert_one_line_error(rc, stderr, "holds the training workdir", "--overwrite would delete it")
  rc, _, stderr = _run("rflow_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'o3'}", "--format=onnx")
  _assert_one_line_error(rc, stderr, "--format", "onnx")
  assert not (tmp_path / "o3").exists()


def test_overwrite_replaces_the_whole_out_dir(run, tmp_path):
  """What --overwrite does, through the export function behind the CLI (test_export_errors_are_one_line launches the
  CLI with --overwrite)."""
  workdir, _, _ = run
  out = tmp_path / "o"
  out.mkdir()
  (out / "stale.txt").write_text("not an export")
  export = lambda: export_workdir.export_workdir(workdir, out, fmt="safetensors", overwrite=True)
  rc, stderr = _main_error(export)  # Only an earlier export (its rflow_jax_export.json) is ever replaced.
  _assert_one_line_error(rc, stderr, "holds no rflow_jax_export.json")
  assert os.listdir(out) == ["stale.txt"]
  (out / "rflow_jax_export.json").write_text("{}")
  export()
  assert sorted(os.listdir(out)) == ["params.safetensors", "rflow_jax_export.json"]
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".o.")]  # No temporary directory left behind.


def test_non_rf_run_refuses_diffusers_format(run, tmp_path):
  workdir, _, _ = run
  other = tmp_path / "eps_run"
  other.mkdir()
  config = json.loads((workdir / "config.json").read_text())
  config["flow"]["formulation"] = "eps/linear"
  (other / "config.json").write_text(json.dumps(config))
  rc, stderr = _main_error(lambda: export_workdir.export_workdir(other, tmp_path / "o"))  # The CLI's default format.
  _assert_one_line_error(rc, stderr, "eps/linear", "--format=safetensors")


def test_sample_with_transformer_matches_sampling_the_workdir(run, tmp_path):
  workdir, _, out = run
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\ntwo blue squares\n", encoding="utf-8")
  images = {}
  for name, extra in (("workdir", []), ("transformer", [f"--transformer={out / 'transformer'}"])):
    rc, stdout, stderr = _run(
        "rflow_jax.sample",
        f"--workdir={workdir}",
        f"--prompts={prompts}",
        f"--out={tmp_path / name}",
        "--steps=2",
        "--seed=1",
        *extra,
    )
    assert rc == 0, stderr[-3000:]
    assert sorted(os.listdir(tmp_path / name)) == ["000000.png", "000001.png", "grid.png", "rflow_jax_samples.json"]
    assert "wrote 2 images" in stdout
    images[name] = [np.asarray(Image.open(tmp_path / name / f"00000{i}.png")) for i in range(2)]
  for ours, exported in zip(images["workdir"], images["transformer"]):
    assert ours.shape == (32, 32, 3)
    np.testing.assert_array_equal(exported, ours)  # The exported weights are the EMA weights, bit for bit.


def test_sample_transformer_errors(run, tmp_path):
  """Launched: --raw with --transformer (a check of the sample CLI's own). A missing or mismatched transformer is
  refused by rundir.load_sampler, which the CLI calls with its flags: here in this process."""
  workdir, _, out = run
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red circle\n")
  rc, stderr = _main_error(lambda: rundir.load_sampler(str(workdir), transformer=str(tmp_path / "missing")))
  _assert_one_line_error(rc, stderr, "missing")
  rc, _, stderr = _run(
      "rflow_jax.sample",
      f"--workdir={workdir}",
      f"--prompts={prompts}",
      f"--out={tmp_path / 'o'}",
      f"--transformer={out / 'transformer'}",
      "--raw",
  )
  _assert_one_line_error(rc, stderr, "--raw")
  assert not (tmp_path / "o").exists()
  # A transformer whose context width is not the run's text width.
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  cfg = json.loads((out / "transformer" / "config.json").read_text())
  cfg["joint_attention_dim"] = 24
  (wrong / "config.json").write_text(json.dumps(cfg))
  (wrong / "diffusion_pytorch_model.safetensors").write_bytes(
      (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
  )
  rc, stderr = _main_error(lambda: rundir.load_sampler(str(workdir), transformer=str(wrong)))
  _assert_one_line_error(rc, stderr, "joint_attention_dim=24", "text.width=16")


def test_baseline_runs_export_as_safetensors_only(run, tmp_path):
  workdir, _, _ = run
  other = tmp_path / "dit_run"
  other.mkdir()
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["arch"] = "dit"
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="model.arch='dit'.*--format=safetensors"):
    export_workdir.export_workdir(other, tmp_path / "o")
  # The flat format stores the arch, so load_flat rebuilds the right backbone.
  run_model = json.loads((workdir / "config.json").read_text())["model"]
  arch, kwargs = "dit", {**{k: v for k, v in run_model.items() if k != "arch"}, "context_dim": 16, "pooled_dim": 16}
  model = export_workdir.model_from_config(arch, kwargs)
  params = flax.linen.unbox(
      model.init(
          jax.random.key(0),
          np.zeros((1, 32, 32, 3), np.float32),
          np.zeros((1,), np.float32),
          np.zeros((1, 16, 16), np.float32),
          np.zeros((1, 16), np.float32),
      )["params"]
  )
  out = tmp_path / "flat"
  out.mkdir()
  export_workdir.save_flat(params, out / export_workdir.FLAT_WEIGHTS_NAME)
  (out / export_workdir.INFO_NAME).write_text(json.dumps({"arch": arch, "model": kwargs}))
  loaded_model, loaded, _ = export_workdir.load_flat(out)
  assert type(loaded_model).__name__ == "DiT" and loaded_model == model
  flat, loaded_flat = _flat(params), _flat(loaded)
  assert set(flat) == set(loaded_flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(loaded_flat[name], np.asarray(value), err_msg=name)


def test_quickstart_architecture_parity_with_random_weights(tmp_path):
  """The quickstart MM-DiT (patch 4, 3 channels, text width 64) with every weight random, through save_transformer."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from rflow_jax.export import diffusers_io  # pylint: disable=g-import-not-at-top

  config = quickstart.get_config()
  model = mmdit.MMDiT(**registry.model_kwargs(config))
  rng = np.random.RandomState(1)
  b, s, length, width = 2, config.data.image_size, 2 * config.text.max_length, config.text.width
  inputs = (
      rng.randn(b, s, s, 3).astype(np.float32),
      np.array([0.3, 0.8], np.float32),
      rng.randn(b, length, width).astype(np.float32),
      rng.randn(b, width).astype(np.float32),
  )
  shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
  # Random everywhere (N(0, 0.05), qk-norm scales N(1, 0.2)), so the zero-initialised adaLN layers count too.
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (1.0 if "norm" in jax.tree_util.keystr(path) else 0.0)
      + (0.2 if "norm" in jax.tree_util.keystr(path) else 0.05) * rng.randn(*a.shape).astype(np.float32),
      shapes,
  )
  params["pos_embed"] = np.asarray(model.init(jax.random.key(0), *inputs)["params"]["pos_embed"].unbox())
  diffusers_io.save_transformer(params, model, tmp_path / "transformer")
  ref = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").eval()
  ours = np.asarray(model.apply({"params": params}, *inputs))
  x, t, ctx, pooled = inputs
  with torch.no_grad():
    theirs = (
        ref(
            hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t) * 1000.0,
        )
        .sample.numpy()
        .transpose(0, 2, 3, 1)
    )
  err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  print(
      f"quickstart architecture, random weights: max|ours - diffusers| / max|diffusers| = {err:.2e} "
      f"(max|diffusers| = {np.abs(theirs).max():.3f})"
  )
  assert err <= PARITY_RTOL
