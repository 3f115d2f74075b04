"""Loading Hugging Face text encoders and tokenizers from local directories: CLIP text towers and the T5 encoder.

  model, params = load_clip("sd3/text_encoder")     # or text_encoder_2; CLIPTextModel(WithProjection)
  model, params = load_t5("sd3/text_encoder_3")     # T5EncoderModel
  out = model.apply({"params": params}, ids)        # hidden_states, last_hidden_state (, pooled)
  tokenizer = load_tokenizer("sd3/tokenizer", vocab_size=model.cfg.vocab_size)

A directory holds config.json and model.safetensors, or shards listed in model.safetensors.index.json (transformers'
save_pretrained layout). Every check runs on the config and the tensors' shapes before anything is traced or
compiled, and a problem is one line naming the file and the tensor. Layouts: torch Linear weight [out, in] is our
Dense kernel [in, out]; embeddings, norms and T5's relative-position table keep their shape.
"""

import json
import os
import pathlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.export import diffusers_io
from rflow_jax.model.text import clip, common, t5

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
T5_ARCHITECTURES = ("T5EncoderModel",)
# A tensor a checkpoint may carry that is not a weight: CLIP's position_ids buffer (saved by older transformers).
_IGNORED = ("text_model.embeddings.position_ids",)
# A tokenizer may know fewer tokens than the model's table has rows (T5 pads 32100 to 32128, 0.09%), but not many
# fewer: a directory with a missing vocabulary file loads as a tokenizer of a few special tokens, without an error.
TOKENIZER_VOCAB_SLACK = 0.01


class WeightsError(ValueError):
  """A text-encoder directory whose config or tensors do not describe the expected model."""


def _read_config(path: pathlib.Path, architectures, model_types) -> dict[str, Any]:
  diffusers_io.refuse_pickle(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a model directory (config.json + model.safetensors)")
  config_file = path / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} does not exist")
  cfg = json.loads(config_file.read_text())
  archs = cfg.get("architectures") or []
  if cfg.get("model_type") not in model_types or (archs and archs[0] not in architectures):
    raise WeightsError(
        f"{config_file} describes {archs[0] if archs else '?'} (model_type "
        f"{cfg.get('model_type')!r}), not one of {list(architectures)}"
    )
  return cfg


def _activation(config_file, name: str) -> str:
  if name not in common.ACTIVATIONS:
    raise WeightsError(f"{config_file}: activation {name!r} is not supported; valid: {sorted(common.ACTIVATIONS)}")
  return name


def clip_config(path: str | os.PathLike[str]) -> tuple[clip.CLIPTextConfig, dict[str, Any]]:
  """Reads a CLIPTextModel(WithProjection) config.json; returns our config and the raw dict."""
  path = pathlib.Path(path)
  raw = _read_config(path, CLIP_ARCHITECTURES, ("clip_text_model",))
  archs = raw.get("architectures") or ["CLIPTextModelWithProjection"]
  projection = raw.get("projection_dim", raw["hidden_size"]) if archs[0] == "CLIPTextModelWithProjection" else 0
  return (
      clip.CLIPTextConfig(
          vocab_size=raw["vocab_size"],
          width=raw["hidden_size"],
          depth=raw["num_hidden_layers"],
          num_heads=raw["num_attention_heads"],
          mlp_dim=raw["intermediate_size"],
          max_length=raw["max_position_embeddings"],
          act=_activation(path / "config.json", raw["hidden_act"]),
          eps=raw["layer_norm_eps"],
          eos_token_id=raw["eos_token_id"],
          projection_dim=projection,
      ),
      raw,
  )


def t5_config(path: str | os.PathLike[str]) -> tuple[t5.T5Config, dict[str, Any]]:
  """Reads a T5EncoderModel config.json; returns our config and the raw dict."""
  path = pathlib.Path(path)
  raw = _read_config(path, T5_ARCHITECTURES, ("t5",))
  proj = raw.get("feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  act = proj.split("-")[-1]
  act = "gelu_new" if proj == "gated-gelu" else act  # transformers maps gated-gelu to the tanh form (T5 v1.1).
  return (
      t5.T5Config(
          vocab_size=raw["vocab_size"],
          width=raw["d_model"],
          depth=raw["num_layers"],
          num_heads=raw["num_heads"],
          head_dim=raw["d_kv"],
          mlp_dim=raw["d_ff"],
          act=_activation(path / "config.json", act),
          gated=gated,
          num_buckets=raw.get("relative_attention_num_buckets", 32),
          max_distance=raw.get("relative_attention_max_distance", 128),
          eps=raw.get("layer_norm_epsilon", 1e-6),
      ),
      raw,
  )


def _clip_name(key: str) -> str:
  """transformers 5 saves CLIPTextModel without the "text_model." prefix that released checkpoints have."""
  return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def _t5_name(key: str) -> str:
  """T5's token embedding is tied: stored as "shared.weight", "encoder.embed_tokens.weight" or both."""
  return "shared.weight" if key == "encoder.embed_tokens.weight" else key


def clip_entries(cfg: clip.CLIPTextConfig) -> dict[str, tuple[str, bool]]:
  """Our unscanned param path -> (transformers tensor name, transpose?)."""
  out = {
      "token_embedding": ("text_model.embeddings.token_embedding.weight", False),
      "position_embedding": ("text_model.embeddings.position_embedding.weight", False),
      "final_layer_norm/scale": ("text_model.final_layer_norm.weight", False),
      "final_layer_norm/bias": ("text_model.final_layer_norm.bias", False),
  }
  for i in range(cfg.depth):
    theirs = f"text_model.encoder.layers.{i}"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out[f"layers_{i}/{name}/kernel"] = (f"{theirs}.self_attn.{name}.weight", True)
      out[f"layers_{i}/{name}/bias"] = (f"{theirs}.self_attn.{name}.bias", False)
    for name in ("fc1", "fc2"):
      out[f"layers_{i}/{name}/kernel"] = (f"{theirs}.mlp.{name}.weight", True)
      out[f"layers_{i}/{name}/bias"] = (f"{theirs}.mlp.{name}.bias", False)
    for name in ("layer_norm1", "layer_norm2"):
      out[f"layers_{i}/{name}/scale"] = (f"{theirs}.{name}.weight", False)
      out[f"layers_{i}/{name}/bias"] = (f"{theirs}.{name}.bias", False)
  if cfg.projection_dim:
    out["text_projection/kernel"] = ("text_projection.weight", True)
  return out


def t5_entries(cfg: t5.T5Config) -> dict[str, tuple[str, bool]]:
  """Our unscanned param path -> (transformers tensor name, transpose?)."""
  out = {
      "embed": ("shared.weight", False),
      "relative_attention_bias": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
      "final_layer_norm/scale": ("encoder.final_layer_norm.weight", False),
  }
  ff = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  for i in range(cfg.depth):
    theirs = f"encoder.block.{i}.layer"
    out[f"layers_{i}/attn_norm/scale"] = (f"{theirs}.0.layer_norm.weight", False)
    out[f"layers_{i}/ff_norm/scale"] = (f"{theirs}.1.layer_norm.weight", False)
    for name in ("q", "k", "v", "o"):
      out[f"layers_{i}/{name}/kernel"] = (f"{theirs}.0.SelfAttention.{name}.weight", True)
    for name in ff:
      out[f"layers_{i}/{name}/kernel"] = (f"{theirs}.1.DenseReluDense.{name}.weight", True)
  return out


def _flat_shapes(model, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Param shapes of the unscanned model by eval_shape (traces nothing into XLA, compiles nothing)."""
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  abstract = jax.eval_shape(lambda k, i: model.clone(scan_layers=False).init(k, i)["params"], jax.random.key(0), ids)
  abstract = flax.linen.meta.unbox(abstract)
  return flax.traverse_util.flatten_dict(abstract, sep="/")


def _stack_layers(params: dict[str, Any], depth: int) -> dict[str, Any]:
  """layers_0..layers_{depth-1} -> layers/layer with a leading layer axis (the nn.scan layout)."""
  per_layer = [params.pop(f"layers_{i}") for i in range(depth)]
  params["layers"] = {"layer": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}
  return params


def _load_params(
    path: pathlib.Path, model, entries: dict[str, tuple[str, bool]], depth: int, canonical: Callable[[str], str]
) -> dict[str, Any]:
  """Reads, checks and converts the weights of `path` into `model`'s param tree (numpy, param_dtype).

  `canonical` maps a stored tensor name to the name `entries` use (transformers has written the same weights under
  more than one name); messages name the tensor as the file stores it.
  """
  files = diffusers_io.weight_files(path, WEIGHTS_NAME, INDEX_NAME)
  index = path / INDEX_NAME
  where = json.loads(index.read_text())["weight_map"] if index.exists() else {}
  stored = diffusers_io.load_safetensors(files)
  state, original = {}, {}
  for key in sorted(stored):
    name = canonical(key)
    if name not in state:  # Tied tensors saved under two names hold the same values: keep one.
      state[name], original[name] = stored[key], key
  file_of = lambda name: path / where[original[name]] if original[name] in where else files[0]
  shapes = _flat_shapes(model, 1)
  missing_from = index if index.exists() else files[0]
  dtype = np.dtype(model.param_dtype)
  flat = {}
  for ours, (theirs, transpose) in entries.items():
    want = tuple(shapes[ours].shape)
    want_theirs = want[::-1] if transpose else want
    if theirs not in state:
      raise WeightsError(f"{missing_from}: tensor {theirs} is missing (expected shape {want_theirs})")
    got = tuple(state[theirs].shape)
    if got != want_theirs:
      raise WeightsError(
          f"{file_of(theirs)}: tensor {original[theirs]} has shape {got}, expected {want_theirs} from "
          f"{path / 'config.json'}"
      )
    value = np.asarray(state.pop(theirs))
    flat[ours] = np.ascontiguousarray(value.T if transpose else value, dtype=dtype)
  extra = sorted(k for k in state if k not in _IGNORED)
  if extra:
    raise WeightsError(
        f"{file_of(extra[0])}: tensor {original[extra[0]]} is not part of the model described by "
        f"{path / 'config.json'} ({len(extra)} unexpected tensors)"
    )
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  return _stack_layers(params, depth) if model.scan_layers else params


def load_clip(
    path: str | os.PathLike[str], subfolder: str = "text_encoder", **overrides: Any
) -> tuple[clip.CLIPText, dict[str, Any]]:
  """Loads a transformers CLIPTextModel / CLIPTextModelWithProjection directory.

  Args:
    path: directory with config.json and model.safetensors (or its sharded index), e.g. `<sd3>/text_encoder_2`; or a
      pipeline directory, whose `subfolder` is read.
    subfolder: of a pipeline directory: "text_encoder" (CLIP-L) or "text_encoder_2" (CLIP-G).
    **overrides: CLIPText attributes that do not change the weights: dtype, param_dtype, scan_layers.

  Returns:
    The module and its params (host numpy arrays in param_dtype).
  """
  path = diffusers_io.component_dir(path, subfolder)
  cfg, _ = clip_config(path)
  model = clip.CLIPText(cfg, **overrides)
  return model, _load_params(path, model, clip_entries(cfg), cfg.depth, _clip_name)


def load_t5(path: str | os.PathLike[str], **overrides: Any) -> tuple[t5.T5Encoder, dict[str, Any]]:
  """Loads a transformers T5EncoderModel directory (e.g. `<sd3>/text_encoder_3`, T5 v1.1 XXL).

  Args:
    path: directory with config.json and model.safetensors (or its sharded index), or a pipeline directory (its
      text_encoder_3/ is read).
    **overrides: T5Encoder attributes that do not change the weights: dtype, param_dtype, scan_layers.

  Returns:
    The module and its params (host numpy arrays in param_dtype).
  """
  path = diffusers_io.component_dir(path, SD3_FOLDERS[2][0])
  cfg, _ = t5_config(path)
  model = t5.T5Encoder(cfg, **overrides)
  return model, _load_params(path, model, t5_entries(cfg), cfg.depth, _t5_name)


def load_tokenizer(path: str | os.PathLike[str], vocab_size: int | None = None, subfolder: str = "tokenizer"):
  """A transformers tokenizer from local files, checked against the model's embedding table.

  Args:
    path: a tokenizer directory (e.g. `<sd3>/tokenizer`, `tokenizer_2`, `tokenizer_3`), or a pipeline directory whose
      `subfolder` is read.
    vocab_size: rows of the model's token embedding; None skips the check.
    subfolder: of a pipeline directory.

  Returns:
    The tokenizer (AutoTokenizer.from_pretrained with local_files_only).
  """
  import transformers  # pylint: disable=g-import-not-at-top  (heavy; only loaders of real encoders need it)

  path = diffusers_io.component_dir(path, subfolder)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a tokenizer directory")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise WeightsError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
  n = len(tokenizer)
  if vocab_size is not None and not vocab_size * (1 - TOKENIZER_VOCAB_SLACK) <= n <= vocab_size:
    raise WeightsError(
        f"{path}: tokenizer has {n} tokens but the model's embedding has {vocab_size} rows "
        f"(a vocabulary file missing from the directory?)"
    )
  return tokenizer


# SD3 pipeline directories: (encoder subfolder, tokenizer subfolder) per encoder, in SD3TextStack's order.
SD3_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))


def sd3_stack(path: str | os.PathLike[str], t5_length: int, use_t5: bool = True, **overrides: Any):
  """SD3's tokenizer and text stack from a pipeline directory's configs and tokenizers (no weights read).

  Args:
    path: a StableDiffusion3Pipeline directory (text_encoder*/ and tokenizer*/ subfolders; with use_t5=False,
      text_encoder_3/ and tokenizer_3/ may be absent, and transformer/config.json gives the context width).
    t5_length: T5 tokens per prompt (diffusers' pipeline: 256; the paper: 77).
    use_t5: False leaves T5 out (its context tokens are zeros; text_encoder_3 is never read).
    **overrides: encoder attributes that do not change the weights: dtype, param_dtype, scan_layers.

  Returns:
    (SD3Tokenizer, SD3TextStack), the stack's empty_tokens set to the tokenized empty prompt.
  """
  from rflow_jax.model.text import sd3, sd3_tokenizer  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  (l_dir, l_tok), (g_dir, g_tok), (t_dir, t_tok) = ((path / e, path / t) for e, t in SD3_FOLDERS)
  l_cfg, _ = clip_config(l_dir)
  g_cfg, _ = clip_config(g_dir)
  t_cfg = t5_config(t_dir)[0] if use_t5 else None
  # Without T5 the context keeps the transformer's width (joint_attention_dim), as diffusers' zeros do.
  width = (
      t_cfg.width if use_t5 else json.loads((path / "transformer" / "config.json").read_text())["joint_attention_dim"]
  )
  tokenizer = sd3_tokenizer.SD3Tokenizer(
      load_tokenizer(l_tok, l_cfg.vocab_size),
      load_tokenizer(g_tok, g_cfg.vocab_size),
      load_tokenizer(t_tok, t_cfg.vocab_size) if use_t5 else None,
      t5_length,
  )
  stack = sd3.SD3TextStack(
      clip.CLIPText(l_cfg, **overrides),
      clip.CLIPText(g_cfg, **overrides),
      t5.T5Encoder(t_cfg, **overrides) if use_t5 else None,
      t5_length=t5_length,
      context_width=width,
      empty_tokens=tokenizer.empty(),
  )
  return tokenizer, stack


def sd3_params(path: str | os.PathLike[str], stack) -> dict[str, Any]:
  """The weights of `stack` (from `sd3_stack`) read from the pipeline directory `path`."""
  path = pathlib.Path(path)
  params = {
      "clip_l": _load_params(
          path / SD3_FOLDERS[0][0], stack.clip_l, clip_entries(stack.clip_l.cfg), stack.clip_l.cfg.depth, _clip_name
      ),
      "clip_g": _load_params(
          path / SD3_FOLDERS[1][0], stack.clip_g, clip_entries(stack.clip_g.cfg), stack.clip_g.cfg.depth, _clip_name
      ),
  }
  if stack.t5 is not None:
    params["t5"] = _load_params(
        path / SD3_FOLDERS[2][0], stack.t5, t5_entries(stack.t5.cfg), stack.t5.cfg.depth, _t5_name
    )
  return params
