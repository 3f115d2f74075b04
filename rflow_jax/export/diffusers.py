"""Exact conversion between `MMDiT` params and diffusers' SD3Transformer2DModel.

Every layout difference between our Flax tree and a PyTorch state dict lives
in `LAYOUTS` below (the original SD3 single-file layout in
`rflow_jax.export.original` reuses them; it only renames keys):

  torch Linear weight [out, in]          <-> Dense kernel [in, out]
  Conv2d weight [H, C, p, p] (OIHW)      <-> patch_embed kernel [p*p*C, H]
                                             (HWIO flattened, (p_row, p_col, c))
  to_q / to_k / to_v  (3 x [H, H])       <-> fused qkv kernel [H, 3, H]
  adaLN (scale, shift) of norm_out and   <-> our (shift, scale) (the original
    the last block's norm1_context           SD3 order; diffusers swaps them)
  pos_embed.pos_embed [1, M*M, H]        <-> pos_embed [M*M, H]

Timesteps: diffusers' forward takes `timestep = 1000 * sigma`; ours takes
t = sigma in [0, 1] and applies the factor inside (embeddings.TIMESTEP_SCALE),
so converted weights need no change. Latents: diffusers NCHW, ours NHWC.

This module is the name and layout map (and the model config); reading and
writing diffusers directories is rflow_jax/export/diffusers_io.py.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.model import mmdit
from rflow_jax.model import mmdit_tree

Params = dict[str, Any]

CLASS_NAME = "SD3Transformer2DModel"


# ----------------------------------------------------------------------------
# Layouts: (ours -> theirs, theirs -> ours) for one param, numpy or jnp (`xp`).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our params is stored as one or more torch tensors.

  Attributes:
    to_torch: (our array, xp) -> tuple of torch-layout arrays.
    from_torch: (tuple of torch-layout arrays, xp) -> our array.
  """

  to_torch: Callable[[Any, Any], tuple[Any, ...]]
  from_torch: Callable[[Sequence[Any], Any], Any]


def _swap_halves(a, xp, axis):
  first, second = xp.split(a, 2, axis=axis)
  return xp.concatenate([second, first], axis=axis)


LAYOUTS: dict[str, Layout] = {
    "copy": Layout(lambda a, xp: (a,), lambda ts, xp: ts[0]),
    "linear": Layout(lambda k, xp: (k.T,), lambda ts, xp: ts[0].T),
    # Our qkv kernel (H, 3, H) <-> three torch Linear weights (H, H).
    "qkv_split": Layout(
        lambda k, xp: tuple(k[:, i, :].T for i in range(3)), lambda ts, xp: xp.stack([w.T for w in ts], axis=1)
    ),
    "qkv_bias_split": Layout(lambda b, xp: tuple(b[i] for i in range(3)), lambda ts, xp: xp.stack(list(ts), axis=0)),
    # Original SD3 fused qkv weight (3H, H), rows [q; k; v] <-> (H, 3, H).
    "qkv_fused": Layout(
        lambda k, xp: (k.reshape(k.shape[0], -1).T,), lambda ts, xp: ts[0].T.reshape(ts[0].shape[1], 3, -1)
    ),
    "qkv_bias_fused": Layout(lambda b, xp: (b.reshape(-1),), lambda ts, xp: ts[0].reshape(3, -1)),
    # Our (shift, scale) modulation <-> diffusers' AdaLayerNormContinuous
    # (scale, shift).
    "linear_swap": Layout(
        lambda k, xp: (_swap_halves(k, xp, axis=1).T,), lambda ts, xp: _swap_halves(ts[0].T, xp, axis=1)
    ),
    "bias_swap": Layout(lambda b, xp: (_swap_halves(b, xp, axis=0),), lambda ts, xp: _swap_halves(ts[0], xp, axis=0)),
    "pos_table": Layout(lambda a, xp: (a[None],), lambda ts, xp: ts[0][0]),
}


def _patch_layout(patch_size: int, in_channels: int) -> Layout:
  """Conv2d OIHW weight <-> our flattened (p*p*C, H) patch kernel."""
  p, c = patch_size, in_channels

  def to_torch(k, xp):
    del xp
    return (k.reshape(p, p, c, k.shape[-1]).transpose(3, 2, 0, 1),)

  def from_torch(ts, xp):
    del xp
    w = ts[0]  # (H, C, p, p)
    return w.transpose(2, 3, 1, 0).reshape(p * p * c, w.shape[0])

  return Layout(to_torch, from_torch)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our params and the torch tensors that hold it.

  Attributes:
    ours: '/'-joined path in our param tree.
    theirs: torch state-dict keys, in the order the layout produces them.
    layout: a key of LAYOUTS, or "patch" (needs the model's p and C).
  """

  ours: str
  theirs: tuple[str, ...]
  layout: str


def _layout(entry: Entry, model: mmdit.MMDiT) -> Layout:
  if entry.layout == "patch":
    return _patch_layout(model.patch_size, model.in_channels)
  return LAYOUTS[entry.layout]


def _linear(ours: str, theirs: str, swap: bool = False) -> list[Entry]:
  """Kernel + bias entries of a Dense <-> torch Linear."""
  return [
      Entry(f"{ours}/kernel", (f"{theirs}.weight",), "linear_swap" if swap else "linear"),
      Entry(f"{ours}/bias", (f"{theirs}.bias",), "bias_swap" if swap else "copy"),
  ]


def _attention(
    ours: str, theirs: str, q: str, k: str, v: str, q_norm: str, k_norm: str, out: str | None, qk_norm: bool
) -> list[Entry]:
  """Entries of one attention's projections (diffusers naming)."""
  names = tuple(f"{theirs}.{n}" for n in (q, k, v))
  entries = [
      Entry(f"{ours}/qkv/kernel", tuple(f"{n}.weight" for n in names), "qkv_split"),
      Entry(f"{ours}/qkv/bias", tuple(f"{n}.bias" for n in names), "qkv_bias_split"),
  ]
  if qk_norm:
    entries += [
        Entry(f"{ours}/q_norm/scale", (f"{theirs}.{q_norm}.weight",), "copy"),
        Entry(f"{ours}/k_norm/scale", (f"{theirs}.{k_norm}.weight",), "copy"),
    ]
  if out is not None:
    entries += _linear(f"{ours}/proj", f"{theirs}.{out}")
  return entries


def diffusers_entries(model: mmdit.MMDiT) -> list[Entry]:
  """The complete our-param <-> diffusers-key table for a model config."""
  qk = model.qk_norm is not None
  e = [
      Entry("pos_embed", ("pos_embed.pos_embed",), "pos_table"),
      Entry("patch_embed/kernel", ("pos_embed.proj.weight",), "patch"),
      Entry("patch_embed/bias", ("pos_embed.proj.bias",), "copy"),
  ]
  e += _linear("t_embedder/fc1", "time_text_embed.timestep_embedder.linear_1")
  e += _linear("t_embedder/fc2", "time_text_embed.timestep_embedder.linear_2")
  e += _linear("y_embedder/fc1", "time_text_embed.text_embedder.linear_1")
  e += _linear("y_embedder/fc2", "time_text_embed.text_embedder.linear_2")
  e += _linear("context_embedder", "context_embedder")
  for i in range(model.depth):
    ours, theirs = f"blocks_{i}", f"transformer_blocks.{i}"
    last = i == model.depth - 1
    e += _linear(f"{ours}/x/modulation", f"{theirs}.norm1.linear")
    e += _attention(f"{ours}/x/attn", f"{theirs}.attn", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", qk)
    if i in model.dual_attention_layers:
      e += _attention(f"{ours}/x/attn2", f"{theirs}.attn2", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", qk)
    e += _linear(f"{ours}/x/mlp/fc1", f"{theirs}.ff.net.0.proj")
    e += _linear(f"{ours}/x/mlp/fc2", f"{theirs}.ff.net.2")
    e += _linear(f"{ours}/context/modulation", f"{theirs}.norm1_context.linear", swap=last)
    e += _attention(
        f"{ours}/context/attn",
        f"{theirs}.attn",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "norm_added_q",
        "norm_added_k",
        None if last else "to_add_out",
        qk,
    )
    if not last:
      e += _linear(f"{ours}/context/mlp/fc1", f"{theirs}.ff_context.net.0.proj")
      e += _linear(f"{ours}/context/mlp/fc2", f"{theirs}.ff_context.net.2")
  e += _linear("final_layer/modulation", "norm_out.linear", swap=True)
  e += _linear("final_layer/proj", "proj_out")
  return e


# ----------------------------------------------------------------------------
# Generic conversion with validation (shared with export.original).
# ----------------------------------------------------------------------------


def abstract_params(model: mmdit.MMDiT) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the unscanned params (no allocation).

  Conversion always works on the unscanned (blocks_i) layout; scanned models
  are stacked / unstacked with mmdit_tree.stack_blocks / unstack_blocks.
  """
  model = model.clone(scan_blocks=False)
  p = model.patch_size
  f32 = jnp.float32
  shapes = jax.eval_shape(
      model.init,
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, p, p, model.in_channels), f32),
      jax.ShapeDtypeStruct((1,), f32),
      jax.ShapeDtypeStruct((1, 1, model.context_dim), f32),
      jax.ShapeDtypeStruct((1, model.pooled_dim), f32),
  )["params"]
  return flax.traverse_util.flatten_dict(nn.unbox(shapes), sep="/")


def _checked_entries(entries: Sequence[Entry], model: mmdit.MMDiT):
  """Pairs each entry with its expected torch shapes; checks coverage."""
  ours = abstract_params(model)
  covered = {e.ours for e in entries}
  if covered != set(ours):  # A bug in the tables, not in the user's input.
    raise AssertionError(
        f"conversion table out of sync with MMDiT: missing "
        f"{sorted(set(ours) - covered)}, extra "
        f"{sorted(covered - set(ours))}"
    )
  expected = {}
  for e in entries:
    shapes = jax.eval_shape(lambda a, e=e: _layout(e, model).to_torch(a, jnp), ours[e.ours])
    for key, s in zip(e.theirs, shapes):
      expected[key] = tuple(s.shape)
  return ours, expected


def _validate(state_dict: Mapping[str, Any], expected: Mapping[str, tuple], what: str) -> None:
  """One ValueError listing every missing, unexpected or misshapen tensor."""
  problems = []
  for key in sorted(set(expected) - set(state_dict)):
    problems.append(f"missing {key} (expected shape {expected[key]})")
  for key in sorted(set(state_dict) - set(expected)):
    problems.append(f"unexpected {key} (shape {tuple(state_dict[key].shape)})")
  for key in sorted(set(expected) & set(state_dict)):
    got = tuple(state_dict[key].shape)
    if got != expected[key]:
      problems.append(f"wrong shape {key}: expected {expected[key]}, got {got}")
  if problems:
    raise ValueError(
        f"{what} does not match the model config " f"({len(problems)} problems):\n  " + "\n  ".join(problems)
    )


def params_from_state_dict(
    state_dict: Mapping[str, Any], entries: Sequence[Entry], model: mmdit.MMDiT, what: str
) -> Params:
  """Converts a torch-layout dict to our nested params via `entries`."""
  ours, expected = _checked_entries(entries, model)
  _validate(state_dict, expected, what)
  flat = {}
  for e in entries:
    tensors = tuple(np.asarray(state_dict[k]) for k in e.theirs)
    value = _layout(e, model).from_torch(tensors, np)
    flat[e.ours] = np.ascontiguousarray(value, dtype=ours[e.ours].dtype)
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  return mmdit_tree.stack_blocks(params, model) if model.scan_blocks else params


def state_dict_from_params(
    params: Mapping[str, Any], entries: Sequence[Entry], model: mmdit.MMDiT
) -> dict[str, np.ndarray]:
  """Converts our params (boxed or not) to a torch-layout numpy dict."""
  ours, _ = _checked_entries(entries, model)
  params = nn.unbox(dict(params))
  if model.scan_blocks:
    params = mmdit_tree.unstack_blocks(params, model)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  _validate(flat, {k: tuple(v.shape) for k, v in ours.items()}, "params")
  out = {}
  for e in entries:
    tensors = _layout(e, model).to_torch(np.asarray(flat[e.ours]), np)
    for key, t in zip(e.theirs, tensors):
      out[key] = np.ascontiguousarray(t)
  return out


def params_from_diffusers(state_dict: Mapping[str, Any], model: mmdit.MMDiT) -> Params:
  """Our params from a diffusers SD3Transformer2DModel state dict.

  Args:
    state_dict: diffusers key -> array (numpy, or anything np.asarray takes).
    model: the MMDiT whose config matches the checkpoint (see
      `model_from_diffusers_config`).

  Returns:
    Nested dict of host numpy arrays in `model.param_dtype`, the same tree as
    `model.init(...)["params"]` (scanned groups stacked if model.scan_blocks)
    without the logical-partitioning boxes.

  Raises:
    ValueError: listing every missing, unexpected or wrongly shaped tensor.
  """
  return params_from_state_dict(state_dict, diffusers_entries(model), model, "diffusers state dict")


def params_to_diffusers(params: Mapping[str, Any], model: mmdit.MMDiT) -> dict[str, np.ndarray]:
  """A diffusers SD3Transformer2DModel state dict from our params.

  Args:
    params: our param tree (boxed or unboxed).
    model: the MMDiT the params belong to.

  Returns:
    diffusers key -> C-contiguous numpy array (dtype of the params).
  """
  return state_dict_from_params(params, diffusers_entries(model), model)


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------

# SD3Transformer2DModel.__init__ defaults (diffusers 0.42), used for fields a
# config.json leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=18,
    attention_head_dim=64,
    num_attention_heads=18,
    joint_attention_dim=4096,
    caption_projection_dim=1152,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=96,
    dual_attention_layers=(),
    qk_norm=None,
)


def model_from_diffusers_config(cfg: Mapping[str, Any], **overrides: Any) -> mmdit.MMDiT:
  """The MMDiT equivalent to a diffusers SD3Transformer2DModel config.

  Args:
    cfg: the parsed config.json (keys starting with "_" are ignored).
    **overrides: MMDiT attributes to set on top (dtype, remat, ...), which
      must not change the architecture.

  Returns:
    An MMDiT whose params convert exactly to/from that model.

  Raises:
    ValueError: for unknown keys or values we cannot represent.
  """
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"unsupported SD3Transformer2DModel config keys {unknown}")
  c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
  hidden = c["num_attention_heads"] * c["attention_head_dim"]
  if c["caption_projection_dim"] != hidden:
    raise ValueError(
        f"caption_projection_dim={c['caption_projection_dim']} "
        f"must equal num_attention_heads * attention_head_dim "
        f"= {hidden}"
    )
  if not c["pos_embed_max_size"]:
    raise ValueError(
        f"pos_embed_max_size={c['pos_embed_max_size']!r}: only " f"the cropped (SD3) positional table is supported"
    )
  kwargs = dict(
      patch_size=c["patch_size"],
      in_channels=c["in_channels"],
      out_channels=c["out_channels"],
      hidden_size=hidden,
      depth=c["num_layers"],
      num_heads=c["num_attention_heads"],
      mlp_ratio=4.0,
      context_dim=c["joint_attention_dim"],
      pooled_dim=c["pooled_projection_dim"],
      pos_embed_max_size=c["pos_embed_max_size"],
      pos_embed_base=c["sample_size"] // c["patch_size"],
      qk_norm=c["qk_norm"],
      dual_attention_layers=tuple(int(i) for i in c["dual_attention_layers"]),
  )
  arch = sorted(set(overrides) & set(kwargs))
  if arch:
    raise ValueError(f"overrides {arch} would change the architecture")
  return mmdit.MMDiT(**kwargs, **overrides)


def diffusers_config(model: mmdit.MMDiT, sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers SD3Transformer2DModel config (config.json) of a model.

  Args:
    model: the MMDiT.
    sample_size: the side of the model's input in pixels or latent pixels
      (config.data.image_size), diffusers' default generation size. The
      positional table is a stored tensor, so this does not change the
      function; None: pos_embed_base * patch_size, the base grid of its init.
  """
  if model.mlp_ratio != 4.0:
    raise ValueError(f"mlp_ratio={model.mlp_ratio}: diffusers' SD3 " f"transformer has a fixed MLP ratio of 4")
  model.check_config()
  return {
      "_class_name": CLASS_NAME,
      "_diffusers_version": "0.42.1",
      "sample_size": (model.pos_embed_base * model.patch_size if sample_size is None else int(sample_size)),
      "patch_size": model.patch_size,
      "in_channels": model.in_channels,
      "num_layers": model.depth,
      "attention_head_dim": model.hidden_size // model.num_heads,
      "num_attention_heads": model.num_heads,
      "joint_attention_dim": model.context_dim,
      "caption_projection_dim": model.hidden_size,
      "pooled_projection_dim": model.pooled_dim,
      "out_channels": model.output_channels,
      "pos_embed_max_size": model.pos_embed_max_size,
      "dual_attention_layers": list(model.dual_attention_layers),
      "qk_norm": model.qk_norm,
  }
