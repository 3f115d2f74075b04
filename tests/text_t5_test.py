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


def save_t5(path, feed_forward_proj):
  """Saves a tiny random T5EncoderModel ("gated-gelu" as T5 v1.1, or "relu"); returns it."""
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=VOCAB,
      d_model=32,
      d_kv=8,
      d_ff=40,
      num_layers=2,
      num_heads=3,
      feed_forward_proj=feed_forward_proj,
      relative_attention_max_distance=20,
  )
  model = transformers.T5EncoderModel(cfg).eval()
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def saved(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  return save_t5(path, request.param), path


def parity(torch_model, path) -> float:
  """Largest relative error over every hidden state and last_hidden_state, without a mask and (gated) with one."""
  errors = []
  rng = np.random.default_rng(0)
  ids = rng.integers(2, VOCAB, (2, LENGTH))
  ids[0, 9], ids[0, 10:] = 1, 0  # EOS then padding.
  mask = (np.arange(LENGTH)[None] < np.array([[11], [LENGTH]])).astype(np.int64)
  model, params = load_t5(path)
  apply = jax.jit(model.apply)
  # SD3 runs T5 without a mask; other users pass one (checked once, with the gated model).
  for attention_mask in (None, mask) if torch_model.config.is_gated_act else (None,):
    with torch.no_grad():
      ref = torch_model(
          torch.from_numpy(ids),
          attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
          output_hidden_states=True,
      )
    out = apply(
        {"params": params}, jnp.asarray(ids, jnp.int32), None if attention_mask is None else jnp.asarray(attention_mask)
    )
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    errors += [_relerr(a, b) for a, b in zip(out["hidden_states"], ref.hidden_states)]
    errors.append(_relerr(out["last_hidden_state"], ref.last_hidden_state))
  return max(errors)


@pytest.mark.slow
def test_matches_transformers(saved):
  torch_model, path = saved
  assert parity(torch_model, path) < 1e-5
  if torch_model.config.is_gated_act:  # Stacked layers under nn.scan compute the same (once is enough).
    scanned, sparams = load_t5(path, scan_layers=True)
    assert sparams["layers"]["layer"]["wi_0"]["kernel"].shape == (2, 32, 40)
    model, params = load_t5(path)
    ids = jnp.asarray(np.arange(9)[None] % VOCAB, jnp.int32)
    ref_out, out = model.apply({"params": params}, ids), scanned.apply({"params": sparams}, ids)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_relative_buckets_match_transformers():
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top

  for length, buckets, distance in ((300, 32, 128), (64, 16, 20)):
    pos = torch.arange(length)
    ref = modeling_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
        pos[None, :] - pos[:, None], bidirectional=True, num_buckets=buckets, max_distance=distance
    )
    np.testing.assert_array_equal(t5.relative_buckets(length, buckets, distance), ref.numpy())


def test_wrong_architecture(saved, tmp_path):
  _, path = saved
  cfg = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["T5ForConditionalGeneration"]}))
  with pytest.raises(
      text_export.WeightsError,
      match=r"config.json describes T5ForConditionalGeneration \(model_type "
      r"'t5'\), not one of \['T5EncoderModel'\]",
  ):
    load_t5(tmp_path)
