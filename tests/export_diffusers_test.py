"""Parity of MMDiT with diffusers' SD3Transformer2DModel, and the converters.

Tiny random diffusers models (every weight randomised, so the zero-initialised
adaLN layers are exercised) are converted to our params and both are run on
the same inputs (NCHW <-> NHWC, timestep = 1000 t).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders import single_file_utils

import pipeline_util  # tests/pipeline_util.py (pytest puts tests/ on sys.path)
from rflow_jax.export import diffusers as export_diffusers
from rflow_jax.export import diffusers_io
from rflow_jax.export import original as export_original
from rflow_jax.model import mmdit
from rflow_jax.model import mmdit_tree

# name -> (diffusers config, latent (H, W)).
CONFIGS = {
    # SD3-medium-like: no qk-norm, table exactly the grid, 16 channels.
    "plain_c16": (
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            caption_projection_dim=64,
            pooled_projection_dim=40,
            pos_embed_max_size=4,
            dual_attention_layers=(),
            qk_norm=None,
        ),
        (8, 8),
    ),
    # SD3.5-large-like: qk RMSNorm, center crop of a larger table, non-square
    # latents, 3 -> 6 channels.
    "qknorm_crop_nonsquare": (
        dict(
            sample_size=16,
            patch_size=2,
            in_channels=3,
            out_channels=6,
            num_layers=3,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=24,
            caption_projection_dim=64,
            pooled_projection_dim=32,
            pos_embed_max_size=11,
            dual_attention_layers=(),
            qk_norm="rms_norm",
        ),
        (8, 12),
    ),
    # SD3.5-medium-like: dual attention + qk-norm, cropping, tall latents.
    "dual_attention": (
        dict(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=96,
            caption_projection_dim=64,
            pooled_projection_dim=40,
            pos_embed_max_size=8,
            dual_attention_layers=(0, 1),
            qk_norm="rms_norm",
        ),
        (12, 8),
    ),
}
BATCH, CONTEXT_LEN = 2, 5
# fp32 parity bound: max |ours - diffusers| / max |diffusers|.
PARITY_RTOL = 1e-5


def _random_diffusers(cfg: dict, seed: int = 0) -> SD3Transformer2DModel:
  torch.manual_seed(seed)
  model = SD3Transformer2DModel(**cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
        p.normal_(1.0, 0.2)
      else:
        p.normal_(0.0, 0.05)
  return model


def _state_dict(model: SD3Transformer2DModel) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(cfg: dict, hw: tuple[int, int], seed: int = 0):
  rng = np.random.RandomState(seed)
  x = rng.randn(BATCH, *hw, cfg["in_channels"]).astype(np.float32)
  t = np.array([0.25, 0.9], np.float32)
  ctx = rng.randn(BATCH, CONTEXT_LEN, cfg["joint_attention_dim"]).astype(np.float32)
  pooled = rng.randn(BATCH, cfg["pooled_projection_dim"]).astype(np.float32)
  return x, t, ctx, pooled


def _diffusers_forward(model, x, t, ctx, pooled) -> np.ndarray:
  with torch.no_grad():
    out = model(
        hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
        encoder_hidden_states=torch.from_numpy(ctx),
        pooled_projections=torch.from_numpy(pooled),
        timestep=torch.from_numpy(t) * 1000.0,
    ).sample
  return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _rel_err(ours, ref) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers_and_bitwise_roundtrip(name):
  cfg, hw = CONFIGS[name]
  ref = _random_diffusers(cfg)
  sd = _state_dict(ref)
  model = export_diffusers.model_from_diffusers_config(ref.config)
  params = export_diffusers.params_from_diffusers(sd, model)
  inputs = _inputs(cfg, hw)

  ours = jax.jit(model.apply)({"params": params}, *inputs)  # Jitted: op by op, each op would compile alone.
  expected = _diffusers_forward(ref, *inputs)
  assert ours.shape == expected.shape == (BATCH, *hw, cfg["out_channels"])
  err = _rel_err(ours, expected)
  print(f"{name}: max|diff|/max|ref| = {err:.2e} " f"(max|ref| = {np.abs(expected).max():.3f})")
  assert err < PARITY_RTOL

  back = export_diffusers.params_to_diffusers(params, model)
  assert set(back) == set(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  # bf16 compute stays close to the fp32 reference.
  ours16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *inputs)
  err16 = _rel_err(ours16, expected)
  print(f"{name}: bf16 max|diff|/max|ref| = {err16:.2e}")
  assert err16 < 5e-2


def _perturbed_init(model, inputs, seed=1):
  """Init params plus noise (jitted init, numpy noise: no op-by-op JAX)."""
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), *inputs)["params"])
  return pipeline_util.perturb(params, seed + 1, 0.05)


def test_save_transformer_loads_in_diffusers(tmp_path):
  cfg, hw = CONFIGS["qknorm_crop_nonsquare"]
  model = export_diffusers.model_from_diffusers_config(cfg)
  inputs = _inputs(cfg, hw)
  params = _perturbed_init(model, inputs)
  ours = jax.jit(model.apply)({"params": params}, *inputs)

  single = diffusers_io.save_transformer(params, model, tmp_path / "one")
  assert (single / diffusers_io.WEIGHTS_NAME).exists()
  # A tiny shard limit forces the sharded layout with its index.
  sharded = diffusers_io.save_transformer(params, model, tmp_path / "many", max_shard_bytes=256 * 1024)
  index = json.loads((sharded / diffusers_io.INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not list(tmp_path.glob(".*"))  # No temporary directories left.

  for path in (single, sharded):
    ref = SD3Transformer2DModel.from_pretrained(path).eval()
    err = _rel_err(ours, _diffusers_forward(ref, *inputs))
    print(f"save -> from_pretrained ({path.name}): {err:.2e}")
    assert err < PARITY_RTOL
    model2, params2 = diffusers_io.load_transformer(path)
    assert model2 == model
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_save_transformer_refuses_to_clobber(tmp_path):
  cfg, hw = CONFIGS["plain_c16"]
  model = export_diffusers.model_from_diffusers_config(cfg)
  params = _perturbed_init(model, _inputs(cfg, hw))
  out = diffusers_io.save_transformer(params, model, tmp_path / "t")
  with pytest.raises(FileExistsError, match="overwrite"):
    diffusers_io.save_transformer(params, model, out)
  diffusers_io.save_transformer(params, model, out, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_config_roundtrip_and_overrides():
  for cfg, _ in CONFIGS.values():
    model = export_diffusers.model_from_diffusers_config(cfg)
    back = export_diffusers.diffusers_config(model)
    for key, value in cfg.items():
      assert back[key] == (list(value) if isinstance(value, tuple) else value)
  model = export_diffusers.model_from_diffusers_config(CONFIGS["plain_c16"][0], dtype=jnp.bfloat16, remat="full")
  assert model.dtype == jnp.bfloat16 and model.remat == "full"
  with pytest.raises(ValueError, match="depth"):
    export_diffusers.model_from_diffusers_config(CONFIGS["plain_c16"][0], depth=3)
  with pytest.raises(ValueError, match="skip_layers"):
    export_diffusers.model_from_diffusers_config({**CONFIGS["plain_c16"][0], "skip_layers": [1]})
  with pytest.raises(ValueError, match="caption_projection_dim=32"):
    export_diffusers.model_from_diffusers_config({**CONFIGS["plain_c16"][0], "caption_projection_dim": 32})


def test_bad_state_dict_lists_every_problem():
  cfg, _ = CONFIGS["dual_attention"]
  sd = _state_dict(_random_diffusers(cfg))
  model = export_diffusers.model_from_diffusers_config(cfg)
  del sd["transformer_blocks.1.attn2.to_k.weight"]
  del sd["proj_out.bias"]
  sd["transformer_blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  sd["context_embedder.weight"] = np.zeros((64, 95), np.float32)
  with pytest.raises(ValueError) as err:
    export_diffusers.params_from_diffusers(sd, model)
  msg = str(err.value)
  assert "4 problems" in msg
  assert "missing transformer_blocks.1.attn2.to_k.weight (expected shape " "(64, 64))" in msg
  assert "missing proj_out.bias" in msg
  assert "unexpected transformer_blocks.0.attn.extra.weight" in msg
  assert ("wrong shape context_embedder.weight: expected (64, 96), got " "(64, 95)") in msg


def test_pickle_checkpoints_are_refused(tmp_path):
  for suffix in (".bin", ".pt", ".ckpt", ".pth"):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
      export_original.load_original(path, mmdit.MMDiT(depth=1))
  folder = tmp_path / "transformer"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(CONFIGS["plain_c16"][0]))
  (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="refusing to unpickle"):
    diffusers_io.load_transformer(folder)


def _to_original(sd: dict, num_layers: int, dual: tuple[int, ...], qk: bool) -> dict[str, np.ndarray]:
  """Inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""

  def swap(w):  # (scale, shift) -> (shift, scale) along dim 0.
    a, b = np.split(w, 2, axis=0)
    return np.concatenate([b, a], axis=0)

  o = {
      "pos_embed": sd["pos_embed.pos_embed"],
      "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
      "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
  }
  for ours, theirs in [
      ("t_embedder.mlp.0", "timestep_embedder.linear_1"),
      ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
      ("y_embedder.mlp.0", "text_embedder.linear_1"),
      ("y_embedder.mlp.2", "text_embedder.linear_2"),
  ]:
    for s in ("weight", "bias"):
      o[f"{ours}.{s}"] = sd[f"time_text_embed.{theirs}.{s}"]
  for s in ("weight", "bias"):
    o[f"context_embedder.{s}"] = sd[f"context_embedder.{s}"]
    o[f"final_layer.linear.{s}"] = sd[f"proj_out.{s}"]
    o[f"final_layer.adaLN_modulation.1.{s}"] = swap(sd[f"norm_out.linear.{s}"])
  for i in range(num_layers):
    b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
    last = i == num_layers - 1
    renames = {
        "x_block.attn.proj": "attn.to_out.0",
        "x_block.adaLN_modulation.1": "norm1.linear",
        "x_block.mlp.fc1": "ff.net.0.proj",
        "x_block.mlp.fc2": "ff.net.2",
    }
    if not last:
      renames.update(
          {
              "context_block.attn.proj": "attn.to_add_out",
              "context_block.adaLN_modulation.1": "norm1_context.linear",
              "context_block.mlp.fc1": "ff_context.net.0.proj",
              "context_block.mlp.fc2": "ff_context.net.2",
          }
      )
    if i in dual:
      renames["x_block.attn2.proj"] = "attn2.to_out.0"
    for s in ("weight", "bias"):
      for ours, theirs in renames.items():
        o[f"{j}.{ours}.{s}"] = sd[f"{b}.{theirs}.{s}"]
      o[f"{j}.x_block.attn.qkv.{s}"] = np.concatenate([sd[f"{b}.attn.to_{n}.{s}"] for n in "qkv"])
      o[f"{j}.context_block.attn.qkv.{s}"] = np.concatenate([sd[f"{b}.attn.add_{n}_proj.{s}"] for n in "qkv"])
      if i in dual:
        o[f"{j}.x_block.attn2.qkv.{s}"] = np.concatenate([sd[f"{b}.attn2.to_{n}.{s}"] for n in "qkv"])
      if last:
        o[f"{j}.context_block.adaLN_modulation.1.{s}"] = swap(sd[f"{b}.norm1_context.linear.{s}"])
    if qk:
      for n in "qk":
        o[f"{j}.x_block.attn.ln_{n}.weight"] = sd[f"{b}.attn.norm_{n}.weight"]
        o[f"{j}.context_block.attn.ln_{n}.weight"] = sd[f"{b}.attn.norm_added_{n}.weight"]
        if i in dual:
          o[f"{j}.x_block.attn2.ln_{n}.weight"] = sd[f"{b}.attn2.norm_{n}.weight"]
  return o


@pytest.mark.parametrize("name", ["plain_c16", "dual_attention"])
def test_original_layout_matches_diffusers_path(name, tmp_path):
  cfg, _ = CONFIGS[name]
  sd = _state_dict(_random_diffusers(cfg, seed=3))
  orig = _to_original(sd, cfg["num_layers"], cfg["dual_attention_layers"], cfg["qk_norm"] is not None)
  # Our inverse is checked against diffusers' own converter.
  redone = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
      {f"model.diffusion_model.{k}": torch.from_numpy(v) for k, v in orig.items()}
  )
  assert set(redone) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(redone[key].numpy(), sd[key], err_msg=key)

  model = export_diffusers.model_from_diffusers_config(cfg)
  expected = export_diffusers.params_from_diffusers(sd, model)
  prefixed = {f"model.diffusion_model.{k}": v for k, v in orig.items()}
  prefixed["first_stage_model.decoder.conv_in.weight"] = np.zeros(3)  # ignored
  path = tmp_path / "sd3_single_file.safetensors"
  safetensors.numpy.save_file(prefixed, str(path))
  got = export_original.load_original(path, model)
  jax.tree.map(np.testing.assert_array_equal, got, expected)

  back = export_original.params_to_original(got, model, prefix="")
  assert set(back) == set(orig)
  for key in orig:
    np.testing.assert_array_equal(back[key], orig[key], err_msg=key)


def test_scanned_model_converts_to_the_same_weights():
  cfg, _ = CONFIGS["dual_attention"]
  sd = _state_dict(_random_diffusers(cfg, seed=5))
  model = export_diffusers.model_from_diffusers_config(cfg)
  scanned = export_diffusers.model_from_diffusers_config(cfg, scan_blocks=True)
  params = export_diffusers.params_from_diffusers(sd, scanned)
  assert "blocks_0_1" in params and "blocks_0" not in params
  jax.tree.map(
      np.testing.assert_array_equal,
      mmdit_tree.unstack_blocks(params, scanned),
      export_diffusers.params_from_diffusers(sd, model),
  )
  back = export_diffusers.params_to_diffusers(params, scanned)
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
