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

Checkpoints are read and written with safetensors only; pickle-based files
(.bin/.pt/.ckpt/.pth) are refused, never unpickled.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from rflow_jax import paths
from rflow_jax.model import mmdit

Params = dict[str, Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")
# diffusers' save_pretrained default shard size ("10GB").
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9
_CLASS_NAME = "SD3Transformer2DModel"


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
        lambda k, xp: tuple(k[:, i, :].T for i in range(3)),
        lambda ts, xp: xp.stack([w.T for w in ts], axis=1)),
    "qkv_bias_split": Layout(
        lambda b, xp: tuple(b[i] for i in range(3)),
        lambda ts, xp: xp.stack(list(ts), axis=0)),
    # Original SD3 fused qkv weight (3H, H), rows [q; k; v] <-> (H, 3, H).
    "qkv_fused": Layout(
        lambda k, xp: (k.reshape(k.shape[0], -1).T,),
        lambda ts, xp: ts[0].T.reshape(ts[0].shape[1], 3, -1)),
    "qkv_bias_fused": Layout(
        lambda b, xp: (b.reshape(-1),),
        lambda ts, xp: ts[0].reshape(3, -1)),
    # Our (shift, scale) modulation <-> diffusers' AdaLayerNormContinuous
    # (scale, shift).
    "linear_swap": Layout(
        lambda k, xp: (_swap_halves(k, xp, axis=1).T,),
        lambda ts, xp: _swap_halves(ts[0].T, xp, axis=1)),
    "bias_swap": Layout(
        lambda b, xp: (_swap_halves(b, xp, axis=0),),
        lambda ts, xp: _swap_halves(ts[0], xp, axis=0)),
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
  return [Entry(f"{ours}/kernel", (f"{theirs}.weight",),
                "linear_swap" if swap else "linear"),
          Entry(f"{ours}/bias", (f"{theirs}.bias",),
                "bias_swap" if swap else "copy")]


def _attention(ours: str, theirs: str, q: str, k: str, v: str,
               q_norm: str, k_norm: str, out: str | None,
               qk_norm: bool) -> list[Entry]:
  """Entries of one attention's projections (diffusers naming)."""
  names = tuple(f"{theirs}.{n}" for n in (q, k, v))
  entries = [
      Entry(f"{ours}/qkv/kernel", tuple(f"{n}.weight" for n in names),
            "qkv_split"),
      Entry(f"{ours}/qkv/bias", tuple(f"{n}.bias" for n in names),
            "qkv_bias_split")]
  if qk_norm:
    entries += [Entry(f"{ours}/q_norm/scale", (f"{theirs}.{q_norm}.weight",),
                      "copy"),
                Entry(f"{ours}/k_norm/scale", (f"{theirs}.{k_norm}.weight",),
                      "copy")]
  if out is not None:
    entries += _linear(f"{ours}/proj", f"{theirs}.{out}")
  return entries


def diffusers_entries(model: mmdit.MMDiT) -> list[Entry]:
  """The complete our-param <-> diffusers-key table for a model config."""
  qk = model.qk_norm is not None
  e = [Entry("pos_embed", ("pos_embed.pos_embed",), "pos_table"),
       Entry("patch_embed/kernel", ("pos_embed.proj.weight",), "patch"),
       Entry("patch_embed/bias", ("pos_embed.proj.bias",), "copy")]
  e += _linear("t_embedder/fc1", "time_text_embed.timestep_embedder.linear_1")
  e += _linear("t_embedder/fc2", "time_text_embed.timestep_embedder.linear_2")
  e += _linear("y_embedder/fc1", "time_text_embed.text_embedder.linear_1")
  e += _linear("y_embedder/fc2", "time_text_embed.text_embedder.linear_2")
  e += _linear("context_embedder", "context_embedder")
  for i in range(model.depth):
    ours, theirs = f"blocks_{i}", f"transformer_blocks.{i}"
    last = i == model.depth - 1
    e += _linear(f"{ours}/x/modulation", f"{theirs}.norm1.linear")
    e += _attention(f"{ours}/x/attn", f"{theirs}.attn", "to_q", "to_k",
                    "to_v", "norm_q", "norm_k", "to_out.0", qk)
    if i in model.dual_attention_layers:
      e += _attention(f"{ours}/x/attn2", f"{theirs}.attn2", "to_q", "to_k",
                      "to_v", "norm_q", "norm_k", "to_out.0", qk)
    e += _linear(f"{ours}/x/mlp/fc1", f"{theirs}.ff.net.0.proj")
    e += _linear(f"{ours}/x/mlp/fc2", f"{theirs}.ff.net.2")
    e += _linear(f"{ours}/context/modulation", f"{theirs}.norm1_context.linear",
                 swap=last)
    e += _attention(f"{ours}/context/attn", f"{theirs}.attn", "add_q_proj",
                    "add_k_proj", "add_v_proj", "norm_added_q",
                    "norm_added_k", None if last else "to_add_out", qk)
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
  are stacked / unstacked with mmdit.stack_blocks / unstack_blocks.
  """
  model = model.clone(scan_blocks=False)
  p = model.patch_size
  f32 = jnp.float32
  shapes = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, p, p, model.in_channels), f32),
      jax.ShapeDtypeStruct((1,), f32),
      jax.ShapeDtypeStruct((1, 1, model.context_dim), f32),
      jax.ShapeDtypeStruct((1, model.pooled_dim), f32))["params"]
  return flax.traverse_util.flatten_dict(nn.unbox(shapes), sep="/")


def _checked_entries(entries: Sequence[Entry], model: mmdit.MMDiT):
  """Pairs each entry with its expected torch shapes; checks coverage."""
  ours = abstract_params(model)
  covered = {e.ours for e in entries}
  if covered != set(ours):  # A bug in the tables, not in the user's input.
    raise AssertionError(f"conversion table out of sync with MMDiT: missing "
                         f"{sorted(set(ours) - covered)}, extra "
                         f"{sorted(covered - set(ours))}")
  expected = {}
  for e in entries:
    shapes = jax.eval_shape(lambda a, e=e: _layout(e, model).to_torch(a, jnp),
                            ours[e.ours])
    for key, s in zip(e.theirs, shapes):
      expected[key] = tuple(s.shape)
  return ours, expected


def _validate(state_dict: Mapping[str, Any], expected: Mapping[str, tuple],
              what: str) -> None:
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
    raise ValueError(f"{what} does not match the model config "
                     f"({len(problems)} problems):\n  " + "\n  ".join(problems))


def params_from_state_dict(state_dict: Mapping[str, Any],
                           entries: Sequence[Entry], model: mmdit.MMDiT,
                           what: str) -> Params:
  """Converts a torch-layout dict to our nested params via `entries`."""
  ours, expected = _checked_entries(entries, model)
  _validate(state_dict, expected, what)
  flat = {}
  for e in entries:
    tensors = tuple(np.asarray(state_dict[k]) for k in e.theirs)
    value = _layout(e, model).from_torch(tensors, np)
    flat[e.ours] = np.ascontiguousarray(value, dtype=ours[e.ours].dtype)
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  return mmdit.stack_blocks(params, model) if model.scan_blocks else params


def state_dict_from_params(params: Mapping[str, Any],
                           entries: Sequence[Entry],
                           model: mmdit.MMDiT) -> dict[str, np.ndarray]:
  """Converts our params (boxed or not) to a torch-layout numpy dict."""
  ours, _ = _checked_entries(entries, model)
  params = nn.unbox(dict(params))
  if model.scan_blocks:
    params = mmdit.unstack_blocks(params, model)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  _validate(flat, {k: tuple(v.shape) for k, v in ours.items()}, "params")
  out = {}
  for e in entries:
    tensors = _layout(e, model).to_torch(np.asarray(flat[e.ours]), np)
    for key, t in zip(e.theirs, tensors):
      out[key] = np.ascontiguousarray(t)
  return out


def params_from_diffusers(state_dict: Mapping[str, Any],
                          model: mmdit.MMDiT) -> Params:
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
  return params_from_state_dict(state_dict, diffusers_entries(model), model,
                                "diffusers state dict")


def params_to_diffusers(params: Mapping[str, Any],
                        model: mmdit.MMDiT) -> dict[str, np.ndarray]:
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
    sample_size=128, patch_size=2, in_channels=16, num_layers=18,
    attention_head_dim=64, num_attention_heads=18, joint_attention_dim=4096,
    caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)


def model_from_diffusers_config(cfg: Mapping[str, Any],
                                **overrides: Any) -> mmdit.MMDiT:
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
  unknown = sorted(k for k in cfg if not k.startswith("_")
                   and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"unsupported SD3Transformer2DModel config keys {unknown}")
  c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items()
                                if not k.startswith("_")}}
  hidden = c["num_attention_heads"] * c["attention_head_dim"]
  if c["caption_projection_dim"] != hidden:
    raise ValueError(f"caption_projection_dim={c['caption_projection_dim']} "
                     f"must equal num_attention_heads * attention_head_dim "
                     f"= {hidden}")
  if not c["pos_embed_max_size"]:
    raise ValueError(f"pos_embed_max_size={c['pos_embed_max_size']!r}: only "
                     f"the cropped (SD3) positional table is supported")
  kwargs = dict(
      patch_size=c["patch_size"], in_channels=c["in_channels"],
      out_channels=c["out_channels"], hidden_size=hidden,
      depth=c["num_layers"], num_heads=c["num_attention_heads"], mlp_ratio=4.0,
      context_dim=c["joint_attention_dim"],
      pooled_dim=c["pooled_projection_dim"],
      pos_embed_max_size=c["pos_embed_max_size"],
      pos_embed_base=c["sample_size"] // c["patch_size"],
      qk_norm=c["qk_norm"],
      dual_attention_layers=tuple(int(i) for i in c["dual_attention_layers"]))
  arch = sorted(set(overrides) & set(kwargs))
  if arch:
    raise ValueError(f"overrides {arch} would change the architecture")
  return mmdit.MMDiT(**kwargs, **overrides)


def diffusers_config(model: mmdit.MMDiT,
                     sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers SD3Transformer2DModel config (config.json) of a model.

  Args:
    model: the MMDiT.
    sample_size: the side of the model's input in pixels or latent pixels
      (config.data.image_size), diffusers' default generation size. The
      positional table is a stored tensor, so this does not change the
      function; None: pos_embed_base * patch_size, the base grid of its init.
  """
  if model.mlp_ratio != 4.0:
    raise ValueError(f"mlp_ratio={model.mlp_ratio}: diffusers' SD3 "
                     f"transformer has a fixed MLP ratio of 4")
  model.check_config()
  return {
      "_class_name": _CLASS_NAME,
      "_diffusers_version": "0.42.1",
      "sample_size": (model.pos_embed_base * model.patch_size
                      if sample_size is None else int(sample_size)),
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


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def refuse_pickle(path: str | os.PathLike[str]) -> None:
  """Raises ValueError for pickle-based checkpoints (never unpickled)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in PICKLE_SUFFIXES:
    raise ValueError(
        f"{path} is a pickle-based PyTorch checkpoint; refusing to unpickle "
        f"it (arbitrary code execution). Convert it to safetensors first, "
        f"e.g. in a trusted environment: SD3Transformer2DModel."
        f"from_pretrained(...).save_pretrained(dir, safe_serialization=True) "
        f"or safetensors.torch.save_file(torch.load(f), out)")


def load_safetensors(files: Sequence[pathlib.Path]) -> dict[str, np.ndarray]:
  """Merges safetensors files into one numpy dict (duplicates are errors)."""
  out: dict[str, np.ndarray] = {}
  for f in files:
    refuse_pickle(f)
    tensors = safetensors.numpy.load_file(str(f))
    dup = sorted(set(tensors) & set(out))
    if dup:
      raise ValueError(f"{f} repeats tensors {dup[:5]}")
    out.update(tensors)
  return out


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  index = path / INDEX_NAME
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return [path / f for f in sorted(set(weight_map.values()))]
  single = path / WEIGHTS_NAME
  if single.exists():
    return [single]
  pickles = sorted(p.name for p in path.iterdir()
                   if p.suffix.lower() in PICKLE_SUFFIXES)
  if pickles:
    refuse_pickle(path / pickles[0])
  raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def load_transformer(path: str | os.PathLike[str],
                     **overrides: Any) -> tuple[mmdit.MMDiT, Params]:
  """Loads a diffusers SD3 transformer directory as (MMDiT, params).

  Args:
    path: directory with config.json and diffusion_pytorch_model.safetensors
      (or its sharded index), e.g. `<pipeline>/transformer`.
    **overrides: non-architectural MMDiT attributes (dtype, remat, ...).

  Returns:
    The model and its params (host numpy arrays, param_dtype).
  """
  path = pathlib.Path(path)
  refuse_pickle(path)
  if not path.is_dir():
    raise ValueError(f"{path} is not a diffusers transformer directory")
  cfg = json.loads((path / CONFIG_NAME).read_text())
  if cfg.get("_class_name", _CLASS_NAME) != _CLASS_NAME:
    raise ValueError(f"{path / CONFIG_NAME} describes {cfg['_class_name']}, "
                     f"not {_CLASS_NAME}")
  model = model_from_diffusers_config(cfg, **overrides)
  state_dict = load_safetensors(_weight_files(path))
  return model, params_from_diffusers(state_dict, model)


def _shards(state_dict: Mapping[str, np.ndarray],
            max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Greedy split in key order; a tensor larger than the limit stands alone."""
  shards, current, size = [], {}, 0
  for key in sorted(state_dict):
    n = state_dict[key].nbytes
    if current and size + n > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = state_dict[key]
    size += n
  if current:
    shards.append(current)
  return shards


def save_transformer(params: Mapping[str, Any], model: mmdit.MMDiT,
                     out_dir: str | os.PathLike[str],
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     overwrite: bool = False,
                     sample_size: int | None = None) -> pathlib.Path:
  """Writes a diffusers SD3Transformer2DModel directory.

  config.json plus diffusion_pytorch_model.safetensors, or numbered shards
  and diffusion_pytorch_model.safetensors.index.json when the tensors exceed
  `max_shard_bytes`. Everything is written to a temporary sibling directory
  that is renamed into place, so readers never see a partial checkpoint.

  Args:
    params: our param tree (boxed or unboxed; device or host arrays).
    model: the MMDiT the params belong to.
    out_dir: target directory (loadable by SD3Transformer2DModel.
      from_pretrained).
    max_shard_bytes: largest shard size before splitting.
    overwrite: replace an existing out_dir.
    sample_size: config.json's sample_size (see diffusers_config).

  Returns:
    The output directory.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace")
  config = diffusers_config(model, sample_size)
  state_dict = params_to_diffusers(params, model)
  shards = _shards(state_dict, max_shard_bytes)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-",
                                      dir=out_dir.parent))
  paths.make_readable(tmp)  # Not mkdtemp's 0700: the team reads exports.
  try:
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if len(shards) == 1:
      names = [WEIGHTS_NAME]
    else:
      stem = WEIGHTS_NAME.removesuffix(".safetensors")
      names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
               for i in range(len(shards))]
      index = {"metadata": {"total_size": sum(a.nbytes for a in
                                              state_dict.values())},
               "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
      (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for name, shard in zip(names, shards):
      safetensors.numpy.save_file(shard, str(tmp / name),
                                  metadata={"format": "pt"})
    paths.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
