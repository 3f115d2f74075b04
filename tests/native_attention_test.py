"""attention_impl="native": the C++ kernel's output and gradients equal einsum attention's; its fallback warns."""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rflow_jax.model import blocked_attention
from rflow_jax.model import layers
from rflow_jax.model import native_attention
from rflow_jax.model import norms

from native_util import library  # pylint: disable=unused-import (a fixture; tests/ is on sys.path)


def _vjp(impl, q, k, v, g):
  out, pullback = jax.vjp(lambda *a: layers.dot_product_attention(*a, impl), q, k, v)
  return (out,) + pullback(g)


# One program per kernel (static impl): op by op, each op of the forward and backward would compile alone.
_vjp_jit = jax.jit(_vjp, static_argnums=0)


def _inputs(shape_q, shape_kv):
  q, g = (jax.random.normal(jax.random.key(i), shape_q, jnp.float32) for i in (0, 3))
  k, v = (jax.random.normal(jax.random.key(i), shape_kv, jnp.float32) for i in (1, 2))
  return q, k, v, g


@pytest.mark.parametrize(
    "shape_q,shape_kv",
    [
        ((2, 7, 3, 16), (2, 13, 3, 16)),  # T != S, neither a multiple of the 48-row block nor of 8; D = 16.
        ((1, 288, 1, 64), (1, 288, 1, 64)),  # The model's joint length at 256 image tokens: 6 full blocks; one pair.
        ((2, 50, 2, 32), (2, 61, 2, 32)),  # A full block and a 2-row one; D = 32.
        ((1, 5, 1, 20), (1, 3, 1, 20)),  # D not a multiple of 8 (padded scratch columns), S < 8.
    ],
)
def test_native_matches_einsum_attention(library, shape_q, shape_kv):
  """Output and dq, dk, dv (cotangent g, under jit) equal the einsum kernel's within 1e-5, B * N below the threads."""
  del library
  q, k, v, g = _inputs(shape_q, shape_kv)
  for ours, ref in zip(_vjp_jit("native", q, k, v, g), _vjp_jit("einsum", q, k, v, g)):
    assert ours.dtype == ref.dtype == jnp.float32
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_native_grad_of_sum_under_jit_matches_einsum(library):
  """jax.grad of a sum through the custom_vjp, jitted, on enough (batch, head) pairs to keep every thread busy."""
  del library
  q, k, v, _ = _inputs((3, 33, 4, 64), (3, 40, 4, 64))

  def grad(impl):
    return jax.jit(jax.grad(lambda *a: jnp.sum(layers.dot_product_attention(*a, impl) ** 2), argnums=(0, 1, 2)))

  for ours, ref in zip(grad("native")(q, k, v), grad("einsum")(q, k, v)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_native_eager_matches_einsum(library):
  """Outside jit too (each ffi_call then runs as its own program)."""
  del library
  q, k, v, _ = _inputs((2, 9, 2, 16), (2, 9, 2, 16))
  np.testing.assert_allclose(
      np.asarray(native_attention.native_attention(q, k, v)),
      np.asarray(layers.einsum_attention(q, k, v)),
      atol=1e-5,
      rtol=1e-5,
  )


def _packed_reference(streams, scales):
  """The packed kernel's function in JAX: q/k-norm per stream (norms.qk_norm), einsum attention over the
  concatenated tokens, split back per stream."""
  if scales is not None:
    streams = [norms.qk_norm(x, sc) for x, sc in zip(streams, scales)]
  qkv = jnp.concatenate(streams, axis=1)
  out = layers.einsum_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
  return jnp.split(out, [streams[0].shape[1]], axis=1)[: len(streams)]


@pytest.mark.parametrize(
    "b,lengths,n,d,norm",
    [
        (2, (30, 7), 3, 20, True),  # D not a multiple of 8 (scratch path); stream 1 starts inside a 48-row block.
        (1, (61,), 2, 16, True),  # One stream: the second's scales unused.
        (2, (50, 11), 2, 32, False),  # No norm: the in-place layout alone.
    ],
)
def test_packed_matches_norm_then_einsum(library, b, lengths, n, d, norm):
  """The packed kernel (each stream's (B, T_i, 3, N, D) q/k/v read in place, outputs and gradients written per
  stream; q/k RMSNorm fused when scales are given): its outputs and its gradients for every stream and for the
  scales (cotangents g, under jit) equal the JAX reference's within 1e-5."""
  del library
  rng = np.random.RandomState(0)
  # With the norm, rows far from unit RMS (so that it matters); without, unit-variance logits as elsewhere here.
  streams = [jnp.asarray((3 if norm else 1) * rng.randn(b, t, 3, n, d), jnp.float32) for t in lengths]
  scales = jnp.asarray(rng.randn(2, 2, d), jnp.float32) if norm else None
  gs = [jnp.asarray(rng.randn(b, t, n, d), jnp.float32) for t in lengths]

  def vjp(fn):
    outs, pullback = jax.vjp(fn, streams, scales)
    return jax.tree.leaves((outs, pullback(gs)))  # The scales' gradient is None (no leaf) without scales.

  ours = jax.jit(lambda: vjp(native_attention.native_packed_attention))()
  ref = jax.jit(lambda: vjp(_packed_reference))()
  assert len(ours) == len(ref) == 2 * len(lengths) + norm
  for a, r in zip(ours, ref):
    assert a.shape == r.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-5)


def test_packed_falls_back_with_the_norm_applied(monkeypatch, tmp_path):
  """Without the library, the packed form with scales gives the reference's result (norm in JAX, then blocked)."""
  _fresh_loader(monkeypatch, str(tmp_path / "absent.so"))
  monkeypatch.setattr(logging, "warning", lambda msg, *args: None)
  rng = np.random.RandomState(2)
  streams = [jnp.asarray(rng.randn(1, t, 3, 2, 16), jnp.float32) for t in (7, 4)]
  scales = jnp.asarray(rng.randn(2, 2, 16), jnp.float32)
  for ours, ref in zip(native_attention.native_packed_attention(streams, scales), _packed_reference(streams, scales)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def _fresh_loader(monkeypatch, path):
  monkeypatch.setattr(native_attention, "LIBRARY_PATH", path)
  monkeypatch.setattr(native_attention, "_load_errors", {})
  monkeypatch.setattr(native_attention, "_warned", set())


def test_missing_library_falls_back_to_blocked_and_warns(monkeypatch, tmp_path):
  """With no library at the loader's path, the blocked kernel's result comes back and one warning says why."""
  missing = str(tmp_path / "absent.so")
  _fresh_loader(monkeypatch, missing)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  q, k, v, _ = _inputs((1, 7, 2, 16), (1, 9, 2, 16))
  out = native_attention.native_attention(q, k, v)
  native_attention.native_attention(q, k, v)  # Warned once only.
  np.testing.assert_array_equal(np.asarray(out), np.asarray(blocked_attention.blocked_attention(q, k, v)))
  assert warnings == [
      f"attention_impl=native falls back to blocked attention: {missing} does not exist (build it with `make "
      "install` or `python -m rflow_jax.model.native_attention`)"
  ]


def test_bfloat16_falls_back_to_blocked_and_warns(monkeypatch, library):
  """The kernel is float32 only: other dtypes take the blocked kernel, whose dtype contract is einsum's."""
  _fresh_loader(monkeypatch, library)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  q, k, v, _ = _inputs((1, 7, 2, 16), (1, 7, 2, 16))
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  out = native_attention.native_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(out, np.float32), np.asarray(blocked_attention.blocked_attention(q, k, v), np.float32)
  )
  assert warnings == ["attention_impl=native falls back to blocked attention: inputs are ['bfloat16'], not float32"]


def test_build_failure_is_one_line(monkeypatch, tmp_path):
  """A compiler that cannot be run gives one line naming it and its flags (what `make install` prints)."""
  monkeypatch.setattr(native_attention, "CXX", str(tmp_path / "no-such-g++"))
  with pytest.raises(RuntimeError, match=r"^native attention: cannot run .*no-such-g\+\+ -O3 -march=native") as e:
    native_attention.build(str(tmp_path / "x.so"))
  assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)  # No half-written library left behind.


@pytest.mark.slow  # Compiles two MM-DiT gradient programs: ~10-20 s on 2 cores.
def test_mmdit_with_native_attention_matches_einsum(library):
  """A tiny MM-DiT (scanned, rematerialised blocks, dual attention) with attention_impl="native": its loss and the
  gradients of every parameter equal the einsum model's (the FFI calls inside nn.scan and jax.checkpoint)."""
  del library
  from rflow_jax.model import mmdit  # pylint: disable=g-import-not-at-top

  cfg = dict(patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=2, context_dim=32, pooled_dim=24)
  cfg.update(pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,), scan_blocks=True, remat="dots")
  rng = np.random.RandomState(1)
  inputs = (
      rng.randn(2, 8, 8, 3).astype(np.float32),
      rng.uniform(size=(2,)).astype(np.float32),
      rng.randn(2, 5, 32).astype(np.float32),
      rng.randn(2, 24).astype(np.float32),
  )
  params = jax.jit(mmdit.MMDiT(**cfg).init)(jax.random.key(0), *inputs)["params"]
  # The zero-initialised modulation and output layers would make every attention gradient zero.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)

  def loss_and_grad(impl):
    model = mmdit.MMDiT(**cfg, attention_impl=impl)
    loss = lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grad("native"), loss_and_grad("einsum")
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4), grads, ref_grads
  )
