"""Tests of the RQ2 baseline backbones (DiT, CrossDiT, UViT) and the parameter-matched variants."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pipeline_util  # tests/pipeline_util.py (pytest puts tests/ on sys.path)
from configs import quickstart
from configs import rq2_baselines
from rflow_jax.model import baselines
from rflow_jax.model import mmdit
from rflow_jax.model import param_matching
from rflow_jax.model import registry

# Every logical name a param may carry (rflow_jax/sharding/rules.py), plus None (replicated).
VOCAB = {"embed", "mlp", "heads", "kv", "modulation", "patch", "cond", "pos", None}
TINY = dict(
    patch_size=2,
    in_channels=3,
    hidden_size=32,
    depth=3,
    num_heads=2,
    context_dim=16,
    pooled_dim=12,
    pos_embed_max_size=6,
    pos_embed_base=4,
    qk_norm="rms_norm",
)
ADALN_ZERO = ("mmdit", "dit", "crossdit")


# Inputs and weight noise come from numpy, and every forward pass is jitted: op-by-op (eager) JAX compiles each op of
# the model on its own, several CPU seconds per model, where one jitted forward is about one.


def _inputs(b=2, h=8, w=12, c=3, length=5, context_dim=16, pooled_dim=12, seed=1):
  rng = np.random.RandomState(seed)
  return (
      rng.randn(b, h, w, c).astype(np.float32),
      rng.uniform(size=(b,)).astype(np.float32),
      rng.randn(b, length, context_dim).astype(np.float32),
      rng.randn(b, pooled_dim).astype(np.float32),
  )


@pytest.fixture(scope="module", params=sorted(registry.ARCHITECTURES))
def tiny(request):
  arch = request.param
  model = registry.build(arch, **TINY)
  inputs = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), *inputs)
  return arch, model, variables, inputs


def _flat(params):
  return flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")


def test_output_shape_and_dtype(tiny):
  _, model, variables, inputs = tiny
  out = jax.jit(model.apply)(variables, *inputs)
  assert out.shape == (2, 8, 12, 3) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  wide = model.clone(out_channels=6)  # Predicting more channels than the input has (e.g. learned variance).
  assert jax.eval_shape(wide.init_with_output, jax.random.key(0), *inputs)[0].shape == (2, 8, 12, 6)


def test_init_output_is_zero_exactly_where_adaln_zero_applies(tiny):
  arch, model, variables, inputs = tiny
  out = np.asarray(jax.jit(model.apply)(variables, *inputs))
  if arch in ADALN_ZERO:
    np.testing.assert_array_equal(out, 0.0)
  else:  # UViT has no adaLN-zero: its init is an ordinary random function.
    assert np.abs(out).max() > 1e-3


def test_adaln_zero_blocks_are_identity_at_init(tiny):
  """With a random output projection, the init output cannot depend on the text tokens if every block is the
  identity (gates and CrossDiT's cross-attention projection zero); UViT's must."""
  arch, model, variables, inputs = tiny
  params = flax.core.unfreeze(nn.unbox(variables["params"]))
  head = params["final_layer"]["proj"] if arch in ADALN_ZERO else params["decoder_pred"]
  head["kernel"] = np.random.RandomState(3).randn(*head["kernel"].shape).astype(np.float32)
  x, t, ctx, pooled = inputs
  apply = jax.jit(model.apply)
  out = apply({"params": params}, x, t, ctx, pooled)
  out_other_text = apply({"params": params}, x, t, ctx + 1.0, pooled)
  assert np.abs(np.asarray(out)).max() > 1e-3
  diff = float(np.abs(np.asarray(out - out_other_text)).max())
  if arch in ADALN_ZERO:
    assert diff == 0.0
  else:
    assert diff > 1e-3


def test_every_param_has_logical_axes_from_the_vocabulary(tiny):
  _, _, variables, _ = tiny
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == b.value.ndim, (b.names, b.value.shape)
    assert set(b.names) <= VOCAB, b.names
    named = [n for n in b.names if n is not None]
    assert len(named) == len(set(named)), b.names  # A mesh axis cannot shard two dims of one array.


def test_jit_grad_is_finite_and_reaches_the_blocks(tiny):
  arch, model, variables, inputs = tiny
  # Nonzero weights everywhere, so that gradients flow through the zero-initialised gates too.
  params = pipeline_util.perturb(nn.unbox(variables["params"]), 5, 0.05)

  def loss(p):
    return jnp.mean(jnp.square(model.apply({"params": p}, *inputs) - inputs[0]))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  flat = _flat(grads)
  for name, g in flat.items():
    assert np.all(np.isfinite(np.asarray(g))), name
  first_block = [n for n in flat if n.startswith(("blocks_0/", "in_blocks_0/"))]
  assert first_block, sorted(flat)
  assert any(float(np.abs(np.asarray(flat[n])).max()) > 0 for n in first_block), arch


def test_structure_of_each_architecture():
  inputs = _inputs()
  names = {
      arch: set(_flat(jax.eval_shape(registry.build(arch, **TINY).init, jax.random.key(0), *inputs)["params"]))
      for arch in ("dit", "crossdit", "uvit")
  }
  stem = {
      "pos_embed",
      "patch_embed/kernel",
      "t_embedder/fc1/kernel",
      "y_embedder/fc2/kernel",
      "context_embedder/kernel",
  }
  for arch, n in names.items():
    assert stem <= n, (arch, sorted(stem - n))
  # DiT: one stream of weights per block (no x/context split).
  assert "blocks_2/modulation/kernel" in names["dit"] and "blocks_2/mlp/fc1/kernel" in names["dit"]
  assert not any("/context/" in k or "/x/" in k for k in names["dit"])
  # CrossDiT: self-attention + cross-attention (q from image, kv from text) + MLP.
  assert {
      "blocks_0/attn/qkv/kernel",
      "blocks_0/cross_attn/q/kernel",
      "blocks_0/cross_attn/kv/kernel",
      "blocks_0/cross_attn/k_norm/scale",
      "blocks_0/mlp/fc2/kernel",
  } <= names["crossdit"]
  # UViT (depth 3): 1 in, 1 mid, 1 out block; only the out block has a long-skip Dense; no modulation at all.
  blocks = {k.split("/")[0] for k in names["uvit"] if "blocks" in k or k.startswith("mid_block")}
  assert blocks == {"in_blocks_0", "mid_block", "out_blocks_0"}
  assert sorted(k for k in names["uvit"] if "/skip/" in k) == ["out_blocks_0/skip/bias", "out_blocks_0/skip/kernel"]
  assert not any("modulation" in k for k in names["uvit"])
  even = _flat(
      jax.eval_shape(registry.build("uvit", **{**TINY, "depth": 4}).init, jax.random.key(0), *inputs)["params"]
  )
  assert {k.split("/")[0] for k in even if "blocks" in k} == {
      "in_blocks_0",
      "in_blocks_1",
      "out_blocks_0",
      "out_blocks_1",
  }


def test_uvit_long_skips_pair_mirrored_blocks():
  """depth 5: out_blocks_0 takes in_blocks_1's output as its skip, out_blocks_1 takes in_blocks_0's (LIFO)."""
  model = registry.build("uvit", **{**TINY, "depth": 5})
  inputs = _inputs()
  variables = jax.jit(model.init)(jax.random.key(0), *inputs)
  capture = lambda mdl, _: isinstance(mdl, baselines.UViTBlock)
  _, state = jax.jit(functools.partial(model.apply, capture_intermediates=capture))(variables, *inputs)
  out = {name: v["__call__"][0] for name, v in state["intermediates"].items()}
  params = nn.unbox(variables["params"])
  block = baselines.UViTBlock(32, 2, 4.0, "rms_norm", "xla", skip=True, dtype=jnp.float32, param_dtype=jnp.float32)
  block_apply = jax.jit(block.apply)
  for i, (prev, mirror, other) in enumerate(
      [("mid_block", "in_blocks_1", "in_blocks_0"), ("out_blocks_0", "in_blocks_0", "in_blocks_1")]
  ):
    p = {"params": params[f"out_blocks_{i}"]}
    np.testing.assert_allclose(block_apply(p, out[prev], out[mirror]), out[f"out_blocks_{i}"], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(block_apply(p, out[prev], out[other]) - out[f"out_blocks_{i}"]).max()) > 1e-3


def test_bad_arch_and_config_values_are_named():
  with pytest.raises(ValueError, match="'vit'"):
    registry.build("vit", **TINY)
  inputs = _inputs()
  init = lambda arch, **kw: jax.eval_shape(registry.build(arch, **{**TINY, **kw}).init, jax.random.key(0), *inputs)
  for arch in ("dit", "crossdit", "uvit"):
    with pytest.raises(ValueError, match="hidden_size=30"):
      init(arch, hidden_size=30)
    with pytest.raises(ValueError, match="qk_norm='layer'"):
      init(arch, qk_norm="layer")
    with pytest.raises(ValueError, match=r"dual_attention_layers=\(0,\).*MMDiT only"):
      init(arch, dual_attention_layers=(0,))
    with pytest.raises(ValueError, match="scan_blocks=True"):
      init(arch, scan_blocks=True)


@pytest.mark.parametrize("arch", ["dit", "crossdit", "uvit"])
def test_remat_and_bf16_match_plain(arch):
  inputs = _inputs()
  model = registry.build(arch, **TINY)
  params = pipeline_util.perturb(nn.unbox(jax.jit(model.init)(jax.random.key(0), *inputs)["params"]), 5, 0.05)
  ref = jax.jit(model.apply)({"params": params}, *inputs)
  remat = jax.jit(model.clone(remat="full").apply)({"params": params}, *inputs)
  np.testing.assert_allclose(remat, ref, rtol=1e-5, atol=1e-5)
  bf16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *inputs)
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(bf16 - ref).max() / jnp.abs(ref).max()) < 5e-2


def test_param_matched_width_hits_the_target():
  # Width 128: steps of 4 (2 heads fixed) move the count by ~6%, so some width lands within ±5%.
  common = {k: v for k, v in TINY.items() if k not in ("depth", "hidden_size", "num_heads")}
  target = param_matching.trainable_param_count(mmdit.MMDiT(**common, depth=2, hidden_size=128, num_heads=2))
  for arch in ("dit", "crossdit", "uvit"):
    shape = param_matching.param_matched_width(arch, 2, target, num_heads=2, **common)
    assert shape["depth"] == 2 and shape["num_heads"] == 2 and shape["hidden_size"] % 4 == 0
    count = param_matching.trainable_param_count(registry.build(arch, **common, **shape))
    assert abs(count / target - 1) <= 0.05, (arch, shape, count, target)
  with pytest.raises(ValueError, match="exactly one of head_dim"):
    param_matching.param_matched_width("dit", 2, target, **common)
  with pytest.raises(ValueError, match=r"closest width \d+ has \d+ params"):  # Steps of 64 are too coarse here.
    param_matching.param_matched_width("dit", 2, target, head_dim=64, **common)


@pytest.mark.parametrize("scale", sorted(rq2_baselines.MATCHED))
def test_rq2_table_is_matched_within_5_percent(scale):
  table, kwargs = rq2_baselines.MATCHED[scale], rq2_baselines.REFERENCE_KWARGS[scale]
  assert set(table) == set(registry.ARCHITECTURES)
  target = param_matching.trainable_param_count(mmdit.MMDiT(**kwargs, **table["mmdit"]))
  for arch, shape in table.items():
    count = param_matching.trainable_param_count(registry.build(arch, **kwargs, **shape))
    print(f"{scale} {arch}: {shape} -> {count:,} params ({count / target - 1:+.1%})")
    assert abs(count / target - 1) <= 0.05, (arch, count, target)


def test_rq2_config_matches_quickstart_and_builds_every_arch():
  qs = registry.model_kwargs(quickstart.get_config())
  expected = {**rq2_baselines.REFERENCE_KWARGS["quickstart"], **rq2_baselines.MATCHED["quickstart"]["mmdit"]}
  assert {k: qs[k] for k in expected} == expected  # The table still describes configs/quickstart.py.
  for arch in rq2_baselines.ARCHS:
    config = rq2_baselines.get_config(f"arch={arch}")
    model = registry.build_model(config)
    s = config.data.image_size
    out = jax.eval_shape(
        model.init_with_output,
        jax.random.key(0),
        jnp.zeros((2, s, s, 3)),
        jnp.zeros((2,)),
        jnp.zeros((2, 2 * config.text.max_length, config.text.width)),
        jnp.zeros((2, config.text.width)),
    )[0]
    assert out.shape == (2, s, s, 3)
  added = []
  rq2_baselines.sweep(lambda **kw: added.append(kw))
  assert [a["model.arch"] for a in added] == list(rq2_baselines.ARCHS)
  with pytest.raises(ValueError, match="arch='vit'"):
    rq2_baselines.get_config("arch=vit")
