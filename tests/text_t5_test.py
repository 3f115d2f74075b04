"""T5 encoder: our loader + Linen module against transformers' T5EncoderModel (gated-gelu and relu), fp32."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rflow_jax.export import load_t5, text as text_export
from rflow_jax.model.text import t5

VOCAB, LENGTH = 48, 40  # 40 tokens reach the log-spaced buckets (distances >= 8 with 32 buckets, max 20 here).


def _relerr(ours, theirs):
  theirs = np.asarray(theirs, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def saved(request, tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                              feed_forward_proj=request.param, relative_attention_max_distance=20)
  model = transformers.T5EncoderModel(cfg).eval()
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return model, path


def test_matches_transformers(saved):
  torch_model, path = saved
  rng = np.random.default_rng(0)
  ids = rng.integers(2, VOCAB, (2, LENGTH))
  ids[0, 9], ids[0, 10:] = 1, 0  # EOS then padding.
  mask = (np.arange(LENGTH)[None] < np.array([[11], [LENGTH]])).astype(np.int64)
  model, params = load_t5(path)
  apply = jax.jit(model.apply)
  for attention_mask in (None, mask):  # SD3 runs T5 without a mask; other users pass one.
    with torch.no_grad():
      ref = torch_model(torch.from_numpy(ids), attention_mask=None if attention_mask is None else
                        torch.from_numpy(attention_mask), output_hidden_states=True)
    out = apply({"params": params}, jnp.asarray(ids, jnp.int32),
                None if attention_mask is None else jnp.asarray(attention_mask))
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
      assert _relerr(ours, theirs) < 1e-5
    assert _relerr(out["last_hidden_state"], ref.last_hidden_state) < 1e-5


def test_relative_buckets_match_transformers():
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top
  for length, buckets, distance in ((300, 32, 128), (64, 16, 20)):
    pos = torch.arange(length)
    ref = modeling_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
        pos[None, :] - pos[:, None], bidirectional=True, num_buckets=buckets, max_distance=distance)
    np.testing.assert_array_equal(t5.relative_buckets(length, buckets, distance), ref.numpy())


def test_scan_layers(saved):
  _, path = saved
  ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 9)), jnp.int32)
  model, params = load_t5(path)
  scanned, sparams = load_t5(path, scan_layers=True)
  ref, out = model.apply({"params": params}, ids), scanned.apply({"params": sparams}, ids)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_wrong_architecture(saved, tmp_path):
  _, path = saved
  cfg = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["T5ForConditionalGeneration"]}))
  with pytest.raises(text_export.WeightsError, match=r"config.json describes T5ForConditionalGeneration \(model_type "
                     r"'t5'\), not one of \['T5EncoderModel'\]"):
    load_t5(tmp_path)
