"""A tiny random diffusers StableDiffusion3Pipeline saved in the test, sampled by rflow_jax (`sample --pipeline`):
the same images as diffusers' for the same prompts, noise, steps, guidance and shift; guidance options; bad input.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
import pipeline_util as pu
from rflow_jax import rundir
from rflow_jax.export import diffusers_io
from rflow_jax.export import pipeline as export_pipeline
from rflow_jax.export import text as export_text
from rflow_jax.export import vae as export_vae
from rflow_jax.sampling import guidance

STEPS, CFG = 4, 4.0


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """(diffusers pipeline, its directory): a stand-in for a downloaded release."""
  path = tmp_path_factory.mktemp("release") / "sd3"
  return pu.tiny_diffusers_pipeline(path), path


def _max_diff(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  assert b.std() > 0.1 and ((b > 0) & (b < 1)).mean() > 0.5, pu.spread(b)  # Not constant, not saturated.
  return float(np.abs(a - b).max())


@pytest.mark.slow
@pytest.mark.parametrize("use_t5", [True, False])
def test_matches_diffusers(released, use_t5):
  pipe, path = released
  sampler, params, text_params, c = rundir.load_pipeline_sampler(
      path, steps=STEPS, cfg=CFG, t5_length=pu.T5_LENGTH, use_t5=use_t5
  )
  assert c.shift == 3.0 and sampler.config.schedule == "diffusers" and sampler.config.solver == "euler"
  ref_pipe = pipe if use_t5 else pu.without_t5(pipe)
  noise = pu.latents()
  for negative in (export_pipeline.DEFAULT_NEGATIVE_PROMPT, pu.NEGATIVE):
    theirs = pu.diffusers_images(ref_pipe, noise, steps=STEPS, cfg=CFG, negative=negative or None)
    diff = _max_diff(pu.ours(sampler, params, text_params, noise, negative), theirs)
    print(f"diffusers -> rflow_jax, T5 {'on' if use_t5 else 'off'}, negative {negative!r}: max |diff| {diff:.2e}")
    print(pu.spread(theirs))
    assert diff <= pu.PARITY


@pytest.mark.slow
def test_skip_layer_guidance_matches_diffusers(released):
  pipe, path = released
  slg = guidance.SkipLayerGuidance(layers=(1,), scale=20.0, start=0.1, stop=0.8)  # Active at steps 1..3 of 4.
  sampler, params, text_params, _ = rundir.load_pipeline_sampler(
      path, steps=STEPS, cfg=CFG, t5_length=pu.T5_LENGTH, skip_layer_guidance=slg
  )
  noise = pu.latents(1)
  theirs = pu.diffusers_images(
      pipe,
      noise,
      steps=STEPS,
      cfg=CFG,
      skip_guidance_layers=[1],
      skip_layer_guidance_scale=20.0,
      skip_layer_guidance_start=0.1,
      skip_layer_guidance_stop=0.8,
  )
  plain = pu.diffusers_images(pipe, noise, steps=STEPS, cfg=CFG)
  effect = float(np.abs(theirs - plain).max())
  diff = _max_diff(pu.ours(sampler, params, text_params, noise, ""), theirs)
  print(f"skip-layer guidance: max |diff| {diff:.2e} (skip-layer guidance changes pixels by up to {effect:.2e})")
  assert diff <= pu.PARITY and diff < effect / 100  # The option changes the images as diffusers' changes them.


@pytest.mark.slow
def test_guidance_interval_matches_diffusers(released):
  """diffusers' pipeline has no interval: a step callback sets its guidance scale to ~1 outside it (at exactly 1 it
  would stop batching the negative), which is what the interval means."""
  pipe, path = released
  cfg = 30.0  # Large, so that guiding at 2 steps of 4 instead of 4 changes the tiny random model's images clearly.
  interval = (0.6, 0.95)  # The 4-step shift-3 grid is 1, 0.9, 0.75, 0.5, 0: guided at steps 1 and 2 only.
  sampler, params, text_params, _ = rundir.load_pipeline_sampler(
      path, steps=STEPS, cfg=cfg, t5_length=pu.T5_LENGTH, guidance_interval=interval
  )
  one = float(np.nextafter(np.float64(1), 2))
  guided = []

  def callback(p, i, t, kwargs):
    del t
    if i + 1 < STEPS:
      sigma = float(p.scheduler.sigmas[i + 1])
      guided.append(interval[0] <= sigma <= interval[1])
      p._guidance_scale = cfg if guided[-1] else one  # pylint: disable=protected-access
    return kwargs

  noise = pu.latents(2)
  theirs = pu.diffusers_images(pipe, noise, steps=STEPS, cfg=one, callback_on_step_end=callback)
  assert guided == [True, True, False]
  plain = pu.diffusers_images(pipe, noise, steps=STEPS, cfg=cfg)
  effect = float(np.abs(theirs - plain).max())
  diff = _max_diff(pu.ours(sampler, params, text_params, noise, ""), theirs)
  print(f"guidance interval: max |diff| {diff:.2e} (the interval changes pixels by up to {effect:.2e})")
  assert diff <= pu.PARITY and diff < effect / 100


def _copy(path, tmp_path, name):
  out = tmp_path / name
  shutil.copytree(path, out)
  return out


def test_bad_pipeline_directories(released, tmp_path):
  """Each is one line naming the file or field, raised before any weight is read or anything compiled."""
  _, path = released
  missing = _copy(path, tmp_path, "missing")
  shutil.rmtree(missing / "vae")
  with pytest.raises(FileNotFoundError, match=r"missing/vae is missing \(.*model_index.json names a AutoencoderKL\)$"):
    rundir.load_pipeline_sampler(missing)

  unet_index = _copy(path, tmp_path, "unet_index")  # model_index.json of an SDXL pipeline's UNet.
  index = json.loads((unet_index / "model_index.json").read_text())
  index["transformer"] = ["diffusers", "UNet2DConditionModel"]
  (unet_index / "model_index.json").write_text(json.dumps(index))
  with pytest.raises(
      export_pipeline.PipelineError, match=r"model_index.json: transformer is a UNet2DConditionModel, not a SD3Transfor"
  ):
    rundir.load_pipeline_sampler(unet_index)

  unet_folder = _copy(path, tmp_path, "unet_folder")  # An SDXL UNet's folder put where the transformer belongs.
  (unet_folder / "transformer" / "config.json").write_text(
      json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 2048})
  )
  with pytest.raises(
      export_pipeline.PipelineError, match=r"transformer/config.json describes UNet2DConditionModel, not SD3Transfor"
  ):
    rundir.load_pipeline_sampler(unet_folder)

  tokenizer = _copy(path, tmp_path, "tokenizer")  # T5's tokenizer where CLIP-L's belongs.
  shutil.rmtree(tokenizer / "tokenizer")
  shutil.copytree(path / "tokenizer_3", tokenizer / "tokenizer")
  with pytest.raises(export_text.WeightsError, match=r"tokenizer/tokenizer: tokenizer has \d+ tokens but the model"):
    rundir.load_pipeline_sampler(tokenizer)

  widths = _copy(path, tmp_path, "widths")  # A transformer of another text stack.
  cfg = json.loads((widths / "transformer" / "config.json").read_text())
  cfg["joint_attention_dim"] = 96
  (widths / "transformer" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(export_pipeline.PipelineError, match=r"joint_attention_dim=96, but text_encoder_3/config.json d_"):
    rundir.load_pipeline_sampler(widths)

  scheduler = _copy(path, tmp_path, "scheduler")
  cfg = json.loads((scheduler / "scheduler" / "scheduler_config.json").read_text())
  cfg["use_dynamic_shifting"] = True
  (scheduler / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
  with pytest.raises(export_pipeline.PipelineError, match=r"scheduler_config.json: use_dynamic_shifting=True is not"):
    rundir.load_pipeline_sampler(scheduler)


def test_loaders_accept_a_pipeline_directory(released):
  _, path = released
  model, _ = diffusers_io.load_transformer(path)
  assert model.depth == 3 and model.in_channels == 4
  vae, _ = export_vae.load_vae(path)
  assert vae.scaling_factor == 1.5305
  clip_g, _ = export_text.load_clip(path, subfolder="text_encoder_2")
  t5, _ = export_text.load_t5(path)
  assert clip_g.cfg.act == "gelu" and t5.cfg.width == 64
  assert export_text.load_tokenizer(path, subfolder="tokenizer_2").pad_token == "!"


@pytest.mark.slow
def test_cli(released, tmp_path):
  """`sample --pipeline --latents` writes the PNGs of diffusers' images; a bad --latents file is one line, before
  anything compiles, and nothing is written."""
  pipe, path = released
  (tmp_path / "prompts.txt").write_text("\n".join(pu.PROMPTS) + "\n")
  noise = pu.latents(4)
  np.save(tmp_path / "noise.npy", noise)
  np.save(tmp_path / "noise64.npy", noise.astype(np.float64))
  np.save(tmp_path / "nhwc.npy", np.ascontiguousarray(noise.transpose(0, 2, 3, 1)))
  common = [f"--pipeline={path}", f"--prompts={tmp_path / 'prompts.txt'}", "--steps=2", "--cfg=3", "--t5_length=8"]
  for name, needle in (
      ("noise64.npy", "noise64.npy' has dtype float64, expected float32"),
      ("nhwc.npy", "nhwc.npy' has shape (2, 8, 8, 4), expected (2, 4, 8, 8) (NCHW)"),
  ):
    rc, _, stderr = cli_util.run_module(
        "rflow_jax.sample", *common, f"--latents={tmp_path / name}", f"--out={tmp_path / 'bad'}"
    )
    cli_util.assert_one_line_error(rc, stderr, needle)
    assert not (tmp_path / "bad").exists()
  rc, stdout, stderr = cli_util.run_module(
      "rflow_jax.sample", *common, f"--latents={tmp_path / 'noise.npy'}", f"--out={tmp_path / 'out'}"
  )
  assert rc == 0, stderr[-3000:]
  assert f"wrote 2 images (pipeline {path})" in stdout
  theirs = pu.diffusers_images(pipe, noise, steps=2, cfg=3.0)
  for i in range(2):
    png = np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png"), np.float32) / 255
    assert np.abs(png - theirs[i]).max() <= 1 / 255 + 1e-3  # PNG rounding; the pixels themselves agree to 1e-6.
  marker = json.loads((tmp_path / "out" / "rflow_jax_samples.json").read_text())
  assert marker["pipeline"] == os.path.abspath(path) and marker["negative_prompt"] == ""


def test_skip_layers_scanned_equals_unscanned():
  """A skipped block inside an nn.scan run gives what the loop of blocks gives (skip-layer guidance of scanned runs)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from rflow_jax.model import mmdit, mmdit_tree  # pylint: disable=g-import-not-at-top

  kw = dict(patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, context_dim=16, pooled_dim=8)
  kw.update(pos_embed_max_size=4, qk_norm="rms_norm")
  loop = mmdit.MMDiT(**kw)
  rng = np.random.RandomState(0)
  x, t = rng.randn(2, 8, 8, 4).astype(np.float32), np.array([0.3, 0.8], np.float32)
  ctx, pooled = rng.randn(2, 5, 16).astype(np.float32), rng.randn(2, 8).astype(np.float32)
  params = pu.perturb(nn.unbox(loop.init(jax.random.key(0), x, t, ctx, pooled)["params"]), 0, 0.05)
  scanned = loop.clone(scan_blocks=True)
  stacked = mmdit_tree.stack_blocks(params, scanned)
  full = loop.apply({"params": params}, x, t, ctx, pooled)
  for skip in ((1,), (0, 2), (3,)):
    ours = loop.clone(skip_layers=skip).apply({"params": params}, x, t, ctx, pooled)
    theirs = scanned.clone(skip_layers=skip).apply({"params": stacked}, x, t, ctx, pooled)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert np.abs(np.asarray(ours) - np.asarray(full)).max() > 1e-3
  with pytest.raises(ValueError, match=r"skip_layers \[4\] outside \[0, 4\)"):
    loop.clone(skip_layers=(4,)).apply({"params": params}, x, t, ctx, pooled)


def test_released_single_file_loads(released, tmp_path):
  """Stability's all-in-one layout (transformer under model.diffusion_model., the LDM VAE under first_stage_model.):
  the same weights as the pipeline directory. The VAE names are checked against diffusers' own LDM conversion."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from diffusers.loaders import single_file_utils  # pylint: disable=g-import-not-at-top

  from rflow_jax.export import original  # pylint: disable=g-import-not-at-top

  pipe, path = released
  model, params = diffusers_io.load_transformer(path)
  vae_state = {k: v.numpy() for k, v in pipe.vae.state_dict().items()}
  ldm_vae = original.vae_to_original(vae_state, levels=2)
  theirs = single_file_utils.convert_ldm_vae_checkpoint(ldm_vae, dict(pipe.vae.config))
  assert set(theirs) == set(vae_state)
  for name, value in theirs.items():
    np.testing.assert_array_equal(np.asarray(value), vae_state[name], err_msg=name)
  file = tmp_path / "sd3_tiny.safetensors"
  safetensors.numpy.save_file({**original.params_to_original(params, model), **ldm_vae}, str(file))

  loaded, loaded_params, vae, vae_params = original.load_single_file(file, norm_num_groups=4)
  assert loaded.clone(pos_embed_base=model.pos_embed_base) == model
  ref_vae, ref_vae_params = export_vae.load_vae(path)
  assert vae == ref_vae
  for ours, ref in ((loaded_params, params), (vae_params, ref_vae_params)):
    flat, flat_ref = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (ours, ref))
    assert [k for k, _ in flat] == [k for k, _ in flat_ref]
    for (k, a), (_, b) in zip(flat, flat_ref):
      np.testing.assert_array_equal(a, b, err_msg=str(k))
  with pytest.raises(ValueError, match=r"no VAE in the file: no tensor first_stage_model.encoder.conv_in.weight"):
    original.vae_from_original(original.params_to_original(params, model))
