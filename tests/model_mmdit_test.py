"""Tests of the MM-DiT module: shapes, init, embeddings, variants, counts.

Parity with diffusers' SD3Transformer2DModel is in export_diffusers_test.py.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import embeddings as d_embeddings

import pipeline_util  # tests/pipeline_util.py (pytest puts tests/ on sys.path)
from rflow_jax.model import embeddings
from rflow_jax.model import mmdit
from rflow_jax.model import mmdit_tree
from rflow_jax.model import variants

VOCAB = {"embed", "mlp", "heads", "kv", "modulation", "patch", "cond", "pos", None}

TINY = dict(
    patch_size=2,
    in_channels=3,
    hidden_size=64,
    depth=3,
    num_heads=2,
    context_dim=32,
    pooled_dim=24,
    pos_embed_max_size=16,
    pos_embed_base=8,
)


def _inputs(b=2, h=8, w=12, c=3, length=5, context_dim=32, pooled_dim=24):
  rng = np.random.RandomState(1)  # numpy: no JAX op compiled for the inputs.
  return (
      rng.randn(b, h, w, c).astype(np.float32),
      rng.uniform(size=(b,)).astype(np.float32),
      rng.randn(b, length, context_dim).astype(np.float32),
      rng.randn(b, pooled_dim).astype(np.float32),
  )


def _random_params(model, inputs, scale=0.05):
  """Params of `model` drawn at random around zero (norm scales around one), from the init's shapes alone: no layer is
  zero, and the init program is neither run nor compiled."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
  centers = jax.tree_util.tree_map_with_path(
      lambda path, a: np.full(a.shape, float("scale" in jax.tree_util.keystr(path)), a.dtype), shapes
  )
  return pipeline_util.perturb(centers, 7, scale)


def _flat(params):
  return flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")


def _assert_trees_close(actual, desired, rtol):
  """Per-leaf max |a - d| <= rtol * max |d| (gradients span many scales)."""

  def check(a, d):
    scale = max(float(np.abs(d).max()), 1e-12)
    assert float(np.abs(np.asarray(a) - d).max()) <= rtol * scale

  jax.tree.map(check, actual, desired)


@pytest.fixture(scope="module")
def tiny():
  model = mmdit.MMDiT(**TINY, qk_norm="rms_norm", dual_attention_layers=(0,))
  inputs = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), *inputs)
  return model, variables, inputs


def test_init_outputs_exactly_zero(tiny):
  model, variables, inputs = tiny
  out = jax.jit(model.apply)(variables, *inputs)  # Jitted: op by op, each of the model's ops would compile alone.
  assert out.shape == (2, 8, 12, 3)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_zero_init_policy_and_other_inits(tiny):
  _, variables, _ = tiny
  flat = _flat(variables["params"])
  for name, value in flat.items():
    zero = "modulation" in name or name.startswith("final_layer/proj") or name.endswith("bias")
    assert (np.all(np.asarray(value) == 0)) == zero, name
  # Timestep MLP ~ normal(0.02); xavier elsewhere has a larger spread here.
  std = np.std(np.asarray(flat["t_embedder/fc1/kernel"]))
  assert 0.015 < std < 0.025, std
  np.testing.assert_array_equal(flat["blocks_0/x/attn/q_norm/scale"], 1.0)


def test_nonzero_params_change_output_and_depend_on_all_inputs(tiny):
  model, variables, inputs = tiny
  params = pipeline_util.perturb(nn.unbox(variables["params"]), 7, 0.02)
  apply = jax.jit(model.apply)
  out = apply({"params": params}, *inputs)
  assert np.all(np.isfinite(np.asarray(out)))
  assert np.abs(np.asarray(out)).max() > 1e-3
  for i in range(1, 4):  # t, context, pooled all matter.
    changed = list(inputs)
    changed[i] = changed[i] + 0.5
    out2 = apply({"params": params}, *changed)
    assert np.abs(np.asarray(out2 - out)).max() > 1e-5, i


def test_logical_axis_names_use_the_vocabulary(tiny):
  _, variables, _ = tiny
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == b.value.ndim
    assert set(b.names) <= VOCAB, b.names
  pos = variables["params"]["pos_embed"]
  assert pos.names == ("pos", "embed")


def test_pos_table_matches_diffusers_init():
  ours = embeddings.sincos_2d_table(64, 12, base_size=8)
  ref = d_embeddings.get_2d_sincos_pos_embed(64, 12, base_size=8, interpolation_scale=1.0, output_type="pt").numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  # The param init uses the same table (jnp path).
  jnp_table = embeddings.sincos_2d_table(64, 12, base_size=8, xp=jnp)
  np.testing.assert_allclose(np.asarray(jnp_table), ref, atol=1e-6)


def test_crop_pos_table_center_and_error():
  table = jnp.arange(6 * 6, dtype=jnp.float32)[:, None]  # row id as value
  crop = embeddings.crop_pos_table(table, 6, 2, 4)
  # top = 2, left = 1: rows 2..3, columns 1..4.
  expected = [r * 6 + c for r in (2, 3) for c in (1, 2, 3, 4)]
  np.testing.assert_array_equal(np.asarray(crop[:, 0]), expected)
  with pytest.raises(ValueError, match="7x4"):
    embeddings.crop_pos_table(table, 6, 7, 4)


def test_timestep_embedding_matches_diffusers():
  t = np.array([0.0, 0.001, 0.37, 1.0], np.float32)
  ref = d_embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(t) * 1000.0).numpy()
  ours = np.asarray(embeddings.timestep_embedding(jnp.asarray(t)))
  # Arguments reach 1000 rad, where XLA's and torch's float32 sin/cos differ
  # by a few 1e-5 (float32 spacing at 1000 is 6e-5).
  np.testing.assert_allclose(ours, ref, atol=5e-5)
  np.testing.assert_allclose(ours[:2], ref[:2], atol=1e-6)


def test_patchify_roundtrip_and_order():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  patches = embeddings.patchify(x, 2)
  assert patches.shape == (2, 2, 3, 12)
  # Feature order (p_row, p_col, c): element (pr=1, pc=0, c=2) of patch (0, 1).
  assert patches[0, 0, 1, 1 * 6 + 0 * 3 + 2] == x[0, 1, 2, 2]
  np.testing.assert_array_equal(embeddings.unpatchify(patches, 2, 3), x)
  with pytest.raises(ValueError, match="latent width"):
    embeddings.patchify(jnp.zeros((1, 4, 5, 3)), 2)


def test_bad_config_values_are_named():
  inputs = _inputs()
  for kwargs, match in [
      (dict(qk_norm="layer_norm"), "layer_norm"),
      (dict(num_heads=3), "num_heads=3"),
      (dict(remat="some"), "some"),
      (dict(attention_impl="flash"), "flash"),
      (dict(dual_attention_layers=(5,)), r"\[5\]"),
  ]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(mmdit.MMDiT(**{**TINY, **kwargs}).init, jax.random.key(0), *inputs)  # Raised while tracing.
  with pytest.raises(ValueError, match="pos_embed_max_size=16"):
    jax.eval_shape(mmdit.MMDiT(**TINY).init, jax.random.key(0), *_inputs(h=40))


def test_remat_matches_plain(tiny):
  model, variables, inputs = tiny
  params = pipeline_util.perturb(nn.unbox(variables["params"]), 7, 0.05)

  @functools.partial(jax.jit, static_argnums=0)
  def grad(m, p):
    return jax.grad(lambda p: jnp.sum(m.apply({"params": p}, *inputs) ** 2))(p)

  _assert_trees_close(grad(model.clone(remat="dots_saveable"), params), grad(model, params), 1e-5)


def test_bf16_forward_close_to_fp32(tiny):
  model, variables, inputs = tiny
  params = pipeline_util.perturb(nn.unbox(variables["params"]), 7, 0.05)
  out32 = jax.jit(model.apply)({"params": params}, *inputs)
  out16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *inputs)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 2e-2, rel


def test_variants():
  assert variants.variant("d24") == dict(depth=24, hidden_size=1536, num_heads=24)
  assert variants.variant("sd3.5-medium")["dual_attention_layers"] == tuple(range(13))
  with pytest.raises(ValueError, match="d99"):
    variants.variant("d99")


@pytest.mark.parametrize(
    "name,expected,with_pos",
    [
        ("d24", 2.03e9, False),
        ("d38", 8.06e9, False),
        ("sd3.5-medium", 2.47e9, True),
    ],
)
def test_param_counts(name, expected, with_pos):
  model = mmdit.MMDiT(**variants.variant(name))
  n = variants.count_params(model, (1, 128, 128, 16), (1, 154, 4096), (1, 2048), include_pos_embed=with_pos)
  assert abs(n / expected - 1) < 0.01, n


def test_block_groups():
  groups = lambda **kw: mmdit_tree.block_groups(mmdit.MMDiT(**{**TINY, "depth": 5, "scan_blocks": True, **kw}))
  assert groups() == [(0, 4), (4, 5)]
  assert groups(dual_attention_layers=(0, 1, 2)) == [(0, 3), (3, 4), (4, 5)]
  assert groups(dual_attention_layers=(1, 4)) == [(0, 1), (1, 2), (2, 4), (4, 5)]
  assert groups(scan_blocks=False) == [(i, i + 1) for i in range(5)]
  assert mmdit_tree.block_name(0, 4) == "blocks_0_3"
  assert mmdit_tree.block_name(4, 5) == "blocks_4"


def test_grown_block_positions():
  assert mmdit_tree.grown_block_positions(4, 6) == [0, 2, 4, 5]
  assert mmdit_tree.grown_block_positions(5, 5) == [0, 1, 2, 3, 4]  # Same depth: each block stays.
  assert mmdit_tree.grown_block_positions(1, 3) == [2]  # Only the context_pre_only block: it stays last.
  for src in range(1, 9):
    for dst in range(src, 12):
      pos = mmdit_tree.grown_block_positions(src, dst)
      assert len(pos) == src and pos == sorted(set(pos)) and pos[0] in (0, dst - 1) and pos[-1] == dst - 1
  with pytest.raises(ValueError, match="cannot grow a depth-5 MM-DiT into depth 3"):
    mmdit_tree.grown_block_positions(5, 3)


@pytest.mark.parametrize("dual,remat", [((), "none"), ((0, 1), "full")])
def test_scan_blocks_matches_unscanned(dual, remat):
  kwargs = dict(TINY, qk_norm="rms_norm", dual_attention_layers=dual)
  plain = mmdit.MMDiT(**kwargs)
  scanned = mmdit.MMDiT(**kwargs, scan_blocks=True, remat=remat)
  inputs = _inputs()
  params = _random_params(plain, inputs)
  stacked = mmdit_tree.stack_blocks(params, scanned)
  # Same tree and shapes as the scanned model's own init.
  init = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), *inputs)["params"])
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, stacked)
  assert any(k.count("_") == 2 for k in stacked)  # At least one scanned group.

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grad(model, p):
    return jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, *inputs) ** 2))(p)

  v_plain, g_plain = value_and_grad(plain, params)
  v_scan, g_scan = value_and_grad(scanned, stacked)
  np.testing.assert_allclose(v_scan, v_plain, rtol=1e-5)
  _assert_trees_close(mmdit_tree.unstack_blocks(g_scan, scanned), g_plain, 1e-4)
  jax.tree.map(np.testing.assert_array_equal, mmdit_tree.unstack_blocks(stacked, scanned), params)


def test_scanned_params_have_a_leading_unnamed_axis():
  model = mmdit.MMDiT(**TINY, scan_blocks=True)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *_inputs())["params"]  # Names and shapes, not values.
  kernel = boxed["blocks_0_1"]["x"]["attn"]["qkv"]["kernel"]
  assert kernel.names == (None, "embed", None, "heads")
  assert kernel.value.shape == (2, 64, 3, 64)


def test_registered_attention_kernel_is_used():
  """The hook for kernels outside jax.nn.dot_product_attention (e.g. a TPU splash kernel)."""
  from rflow_jax.model import layers  # pylint: disable=g-import-not-at-top

  calls = []

  def reference(q, k, v):
    calls.append(q.shape)
    return layers.einsum_attention(q, k, v)

  layers.register_attention("test_einsum", reference)
  try:
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 8)) for i in range(3))
    np.testing.assert_allclose(
        layers.dot_product_attention(q, k, v, "test_einsum"), layers.dot_product_attention(q, k, v, "xla"), atol=1e-5
    )
    assert calls == [(2, 5, 2, 8)]
    with pytest.raises(ValueError, match="already registered"):
      layers.register_attention("xla", reference)
  finally:
    del layers.ATTENTION_IMPLS["test_einsum"]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_einsum_attention_matches_jax_attention(dtype, tol):
  """The einsum kernel is jax.nn.dot_product_attention's function: outputs and all three gradients agree."""
  q, k, v, g = (jax.random.normal(jax.random.key(i), (2, 7, 3, 16), dtype) for i in range(4))
  _assert_same_attention("einsum", "xla", (q, k, v), g, dtype, tol)


def _assert_same_attention(ours_impl, ref_impl, qkv, g, dtype, tol):
  """Outputs and the three input gradients (cotangent g) of two attention_impls agree within tol."""
  from rflow_jax.model import layers  # pylint: disable=g-import-not-at-top

  @functools.partial(
      jax.jit, static_argnums=2
  )  # One program per kernel: op by op, each op of the forward and backward would compile alone.
  def vjp_jit(qkv, g, impl):
    out, pullback = jax.vjp(lambda *a: layers.dot_product_attention(*a, impl), *qkv)
    return (out,) + pullback(g)

  vjp = lambda impl: vjp_jit(qkv, g, impl)

  for ours, ref in zip(vjp(ours_impl), vjp(ref_impl)):
    assert ours.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "shape_q,shape_kv,group_bytes,dtype,tol",
    [
        ((2, 7, 3, 16), (2, 7, 3, 16), 1 << 19, jnp.float32, 1e-5),  # All 6 (batch, head) pairs in one group.
        ((2, 7, 3, 16), (2, 9, 3, 16), 7 * 9 * 4 * 2, jnp.float32, 1e-5),  # T != S, groups of 2 pairs (3 map steps).
        ((2, 7, 3, 16), (2, 7, 3, 16), 1, jnp.bfloat16, 2e-2),  # Groups of 1 pair.
    ],
)
def test_blocked_attention_matches_einsum_attention(shape_q, shape_kv, group_bytes, dtype, tol, monkeypatch):
  """The blocked kernel with its recomputing custom_vjp: output and the three gradients equal the einsum kernel's."""
  from rflow_jax.model import blocked_attention  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(blocked_attention, "GROUP_BYTES", group_bytes)
  q, g = (jax.random.normal(jax.random.key(i), shape_q, dtype) for i in (0, 3))
  k, v = (jax.random.normal(jax.random.key(i), shape_kv, dtype) for i in (1, 2))
  _assert_same_attention("blocked", "einsum", (q, k, v), g, dtype, tol)
