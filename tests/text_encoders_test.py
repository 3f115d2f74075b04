"""Tokenizer and tiny frozen text stack: ids, shapes, per-encoder dropout and the null condition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from rflow_jax.model import text_encoders as te


def _text_config(**kw):
  c = base.get_config().text  # The fields "tiny" ignores keep their defaults.
  c.update(dict(max_length=12, width=32, depth=2, num_heads=2, init_seed=3, drop_prob=0.5))
  c.update(kw)
  return c


def test_tokenizer_ids_and_padding():
  tok = te.WordTokenizer(8)
  ids = tok("A red circle, to the LEFT of")
  words = ["<bos>", "a", "red", "circle", ",", "to", "the", "<eos>"]  # Truncated to 8 with EOS kept.
  assert [tok.vocab[i] for i in ids] == words
  ids = tok("two zebras")
  assert list(ids[:4]) == [te.BOS, tok.vocab.index("two"), te.UNK, te.EOS]
  assert (ids[4:] == te.PAD).all()
  assert tok.batch(["a", "b c"]).shape == (2, 8)


def test_tokenizer_rejects_tiny_length():
  with pytest.raises(ValueError, match="max_length must be >= 3, .*got 2|got 2"):
    te.WordTokenizer(2)


def test_stack_shapes_and_determinism():
  cfg = _text_config()
  tok, stack = te.build(cfg)
  tokens = jnp.asarray(tok.batch(["a red circle", "two blue squares"]))
  p1, p2 = te.init_params(stack, cfg), te.init_params(stack, cfg)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
  outputs = stack.apply({"params": p1}, tokens)
  context, pooled = te.drop_and_compose(outputs, None, 0.0)
  assert context.shape == (2, 24, 32) and pooled.shape == (2, 32)
  # Different captions give different conditioning (the encoder is informative although random).
  assert float(jnp.abs(context[0] - context[1]).max()) > 0.1
  assert float(jnp.abs(pooled[0] - pooled[1]).max()) > 0.1


def test_clip_stream_is_causal():
  cfg = _text_config()
  tok, stack = te.build(cfg)
  params = te.init_params(stack, cfg)
  a = stack.apply({"params": params}, jnp.asarray(tok.batch(["a red circle above a blue square"])))
  b = stack.apply({"params": params}, jnp.asarray(tok.batch(["a red circle below a green triangle"])))
  # Positions before the first differing word (bos, a, red, circle) agree in the causal CLIP stream only.
  np.testing.assert_allclose(a[0][0][0, :4], b[0][0][0, :4], atol=1e-6)
  assert float(jnp.abs(a[1][0][0, :4] - b[1][0][0, :4]).max()) > 1e-3


def test_per_encoder_dropout_statistics():
  cfg = _text_config()
  tok, stack = te.build(cfg)
  tokens = jnp.asarray(tok.batch(["a red circle"] * 4000))
  outputs = stack.apply({"params": te.init_params(stack, cfg)}, tokens)
  context, pooled = te.drop_and_compose(outputs, jax.random.key(0), 0.463)
  clip_kept = np.asarray(jnp.abs(context[:, :12]).sum((1, 2)) > 0)
  t5_kept = np.asarray(jnp.abs(context[:, 12:]).sum((1, 2)) > 0)
  np.testing.assert_array_equal(clip_kept, np.asarray(jnp.abs(pooled).sum(1) > 0))  # Pooled drops with CLIP.
  assert abs(clip_kept.mean() - 0.537) < 0.03 and abs(t5_kept.mean() - 0.537) < 0.03
  assert abs((clip_kept == t5_kept).mean() - (0.537**2 + 0.463**2)) < 0.03  # Independent draws.
  null_ctx, null_pooled = te.null_condition(outputs)
  assert not np.asarray(null_ctx).any() and not np.asarray(null_pooled).any()
