"""CLIP text towers: our loader + Linen module against transformers' CLIPTextModel(WithProjection), fp32."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rflow_jax.export import load_clip, text as text_export

VOCAB, LENGTH = 64, 12


def _relerr(ours, theirs):
  theirs = np.asarray(theirs, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def save_clip(path, name):
  """Saves a tiny random "plain" (CLIP-L-like, no projection) or "projected" (bigG-like) tower; returns the model."""
  if name == "plain":  # quick_gelu, legacy eos_token_id == 2 (argmax pooling).
    return _save(path, name, transformers.CLIPTextModel, hidden_act="quick_gelu", eos_token_id=2)
  # Exact gelu, text projection, pooling at the first eos_token_id.
  return _save(
      path, name, transformers.CLIPTextModelWithProjection, hidden_act="gelu", eos_token_id=VOCAB - 1, projection_dim=24
  )


def _save(path, name, cls, **kw):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=3,
      num_attention_heads=4,
      max_position_embeddings=LENGTH,
      bos_token_id=VOCAB - 2,
      pad_token_id=0,
      **kw,
  )
  model = cls(cfg).eval()
  # Sharded save for one of them: the loader must follow model.safetensors.index.json.
  model.save_pretrained(path, max_shard_size="20KB" if name == "plain" else "1GB")
  return model


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  path = tmp_path_factory.mktemp("plain")
  return save_clip(path, "plain"), path


@pytest.fixture(scope="module")
def projected(tmp_path_factory):
  path = tmp_path_factory.mktemp("projected")
  return save_clip(path, "projected"), path


def parity(torch_model, path) -> float:
  """Largest relative error over every hidden state, last_hidden_state and pooled (text_embeds if projected)."""
  ids = ids_for_test()
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
  model, params = load_clip(path)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 4
  pooled_ref = ref.text_embeds if hasattr(ref, "text_embeds") else ref.pooler_output
  assert out["pooled"].shape == tuple(pooled_ref.shape)
  pairs = list(zip(out["hidden_states"], ref.hidden_states)) + [
      (out["last_hidden_state"], ref.last_hidden_state),
      (out["pooled"], pooled_ref),
  ]
  return max(_relerr(a, b) for a, b in pairs)


def ids_for_test():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB - 3, (3, LENGTH))
  ids[:, 0] = VOCAB - 2
  ids[0, 5:] = VOCAB - 1  # EOS then EOS-as-padding (CLIP-L's tokenizer pads with EOS).
  ids[1, 7], ids[1, 8:] = VOCAB - 1, 0  # EOS then 0-padding (bigG's tokenizer).
  ids[2, -1] = VOCAB - 1
  return ids


@pytest.mark.slow
@pytest.mark.parametrize("which", ["plain", "projected"])
def test_matches_transformers(which, request):
  assert parity(*request.getfixturevalue(which)) < 1e-5


def test_scan_layers(projected):
  _, path = projected
  ids = jnp.asarray(ids_for_test()[:1, :6], jnp.int32)
  model, params = load_clip(path)
  scanned, sparams = load_clip(path, scan_layers=True)
  assert sparams["layers"]["layer"]["fc1"]["kernel"].shape == (3, 32, 48)
  ref, out = model.apply({"params": params}, ids), scanned.apply({"params": sparams}, ids)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_weights(projected, tmp_path):
  _, path = projected
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  key = "text_model.encoder.layers.1.mlp.fc1.weight"
  safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "model.safetensors"))
  with pytest.raises(
      text_export.WeightsError, match=rf"model.safetensors: tensor {key} is missing \(expected " r"shape \(48, 32\)\)$"
  ):
    load_clip(tmp_path)
  safetensors.numpy.save_file({**tensors, key: tensors[key][:, :16]}, str(tmp_path / "model.safetensors"))
  with pytest.raises(
      text_export.WeightsError,
      match=rf"model.safetensors: tensor {key} has shape \(48, 16\), " r"expected \(48, 32\) from .*config.json$",
  ):
    load_clip(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="pytorch_model.bin is a pickle-based PyTorch checkpoint; refusing"):
    load_clip(tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5", "architectures": ["T5EncoderModel"]}))
  with pytest.raises(
      text_export.WeightsError,
      match=r"config.json describes T5EncoderModel \(model_type 't5'\), "
      r"not one of \['CLIPTextModel', 'CLIPTextModelWithProjection'\]",
  ):
    load_clip(tmp_path)
