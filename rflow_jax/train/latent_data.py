"""Training on precomputed records (data.name="precomputed"): identities, the manifest check, what the step needs.

The precompute job (rflow_jax/precompute.py) names in its manifest the VAE and the text encoders it encoded with,
by identity: a sha256 of the VAE's architecture and weights (not of its scaling/shift factors: the stored moments do
not depend on them, so `python -m rflow_jax.export.latent_stats` may set them afterwards), and of the text stack's
weights, compute dtype and tokenization of probe prompts. Before anything is compiled, `LatentData` checks the
manifest against the run's model and config and refuses a mismatch in one line naming the value: latent channels vs
model.in_channels, latent side vs data.image_size (which, for precomputed latents, is the side of the latent the
MM-DiT reads), the text embeddings' shapes vs config.text, and both identities. A bucketed output (data.buckets at
precompute) trains only with the same data.buckets (pixel sizes; each step reads its bucket's (h/f, w/f) latents),
whose patch grids must fit model.pos_embed_max_size; data.image_size is then the side of the square latent the
previews sample.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax import config_lib
from rflow_jax.data import buckets as buckets_lib, precomputed, records
from rflow_jax.export import vae as export_vae
from rflow_jax.model import registry as model_registry, text_encoders
from rflow_jax.train import step as step_lib

PROBE_PROMPTS = ("", "a red circle", "two blue squares to the left of a green triangle")


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")


def vae_identity(model, params) -> str:
  """sha256 of a VAE's architecture (its diffusers config without the latent factors) and of its weights."""
  architecture = {
      k: v for k, v in export_vae.diffusers_config(model).items() if k not in ("scaling_factor", "shift_factor")
  }
  return precomputed.json_sha256({"architecture": architecture, "weights": precomputed.tree_sha256(_flat(params))})


def text_identity(text_config, tokenizer, text_params) -> str:
  """sha256 of what decides the stored embeddings: the encoders' kind, compute dtype, tokenizer and weights."""
  probes = np.asarray(tokenizer.batch(list(PROBE_PROMPTS))).tolist()
  return precomputed.json_sha256(
      {
          "encoders": text_config.encoders,
          "dtype": text_config.dtype,
          "probes": probes,
          "weights": precomputed.tree_sha256(_flat(text_params)),
      }
  )


def text_treedef(text_stack, text_config):
  """The structure of the text stack's outputs (jax.tree.leaves order is the stored text_0, text_1, ...)."""
  tokens = jax.ShapeDtypeStruct((1, text_encoders.dims(text_config)[0]), jnp.int32)
  abstract = jax.eval_shape(lambda k, t: text_stack.init(k, t)["params"], jax.random.key(0), tokens)
  outputs = jax.eval_shape(lambda p, t: text_stack.apply({"params": p}, t), nn.meta.unbox(abstract), tokens)
  return jax.tree.structure(outputs), [tuple(x.shape[1:]) for x in jax.tree.leaves(outputs)]


def load_vae(path: str, dtype: str):
  """The VAE of `vae.path` (a diffusers AutoencoderKL directory, e.g. latent_stats' export) at a compute dtype."""
  if not path:
    raise ValueError(
        "vae.path is empty: name the diffusers AutoencoderKL directory whose latents to precompute "
        "(e.g. the --out of python -m rflow_jax.export.latent_stats)"
    )
  return export_vae.load_vae(path, dtype=model_registry.DTYPES[dtype])


def vae_path(config) -> str:
  """The VAE of a run on precomputed records: vae.path, or ("") the one its data manifest names."""
  return config.vae.path or precomputed.load_manifest(config.data.path)["vae"]["path"]


def run_vae(config):
  """(model, params) of the VAE a latent-space run decodes with (vae_path), or None for a pixel-space run."""
  return load_vae(vae_path(config), config.vae.dtype) if config.data.name == "precomputed" else None


class LatentData:
  """The manifest of config.data.path checked against the run, and what the flow task needs to train on it.

  Attributes:
    manifest: the precompute manifest.
    vae_model, vae_params: the VAE (its scaling/shift factors are the ones training applies; previews decode with it).
    treedef: structure of the text stack's outputs, to rebuild them from the stored leaves.
  """

  def __init__(self, config, text_stack, tokenizer, text_params):
    """Loads the manifest and the VAE and checks them (before anything is compiled).

    Raises:
      records.ManifestError: one line naming the first value of the data that does not match the run.
      config_lib.ConfigError: a bucket's latent patch grid is larger than model.pos_embed_max_size (one line).
    """
    where = f"data.path={config.data.path!r}"
    self.path, self.drop_to, self.image_size = config.data.path, config.text.drop_to, config.data.image_size
    self.manifest = m = precomputed.load_manifest(config.data.path)
    self.sizes = precomputed.bucket_sizes(m)
    h, w, c = precomputed.latent_shapes(m)[0]
    if c != config.model.in_channels:
      raise records.ManifestError(
          f"{where} holds latents of {c} channels, but model.in_channels=" f"{config.model.in_channels}"
      )
    wanted = buckets_lib.sizes(config.data.buckets)
    if wanted != self.sizes:  # Each record has the shape of its bucket at precompute: no other buckets can read it.
      raise records.ManifestError(
          f"{where} holds latents of data.buckets={self.sizes!r}, but data.buckets={wanted!r}"
          if self.sizes
          else f"{where} holds {h}x{w} latents without buckets, but data.buckets={wanted!r} (precompute with them)"
      )
    if self.sizes:
      try:
        buckets_lib.check(
            self.sizes,
            patch_size=config.model.patch_size,
            pos_embed_max_size=config.model.pos_embed_max_size,
            factor=m["buckets"]["factor"],
        )
      except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    elif h != config.data.image_size or w != config.data.image_size:
      raise records.ManifestError(
          f"{where} holds {h}x{w} latents, but data.image_size={config.data.image_size} "
          '(with data.name="precomputed" it is the latent side the MM-DiT reads)'
      )
    self.treedef, shapes = text_treedef(text_stack, config.text)
    _, n_context, d_context, d_pooled = text_encoders.dims(config.text)
    theirs, ours = m["text"]["dims"], {
        "context_tokens": n_context,
        "context_width": d_context,
        "pooled_width": d_pooled,
    }
    for name in ours:
      if theirs[name] != ours[name]:
        raise records.ManifestError(
            f"{where} holds text embeddings of {name}={theirs[name]}, but config.text gives " f"{name}={ours[name]}"
        )
    if [tuple(s) for s in m["text"]["shapes"]] != shapes:
      raise records.ManifestError(
          f"{where} holds text embeddings of shapes {m['text']['shapes']}, but config.text's "
          f"stack gives {[list(s) for s in shapes]}"
      )
    self.vae_model, self.vae_params = run_vae(config)
    identity = vae_identity(self.vae_model, self.vae_params)
    if identity != m["vae"]["identity"]:
      raise records.ManifestError(
          f"{where} was encoded by VAE {m['vae']['identity'][:12]} ({m['vae']['path']}), "
          f"but vae.path={vae_path(config)!r} is VAE {identity[:12]}"
      )
    identity = text_identity(config.text, tokenizer, text_params)
    if identity != m["text"]["identity"]:
      raise records.ManifestError(
          f"{where} was encoded by text encoders {m['text']['identity'][:12]}, but "
          f"config.text gives text encoders {identity[:12]}"
      )

  @property
  def text_keys(self) -> list[str]:
    return [precomputed.text_key(i) for i in range(len(self.manifest["text"]["shapes"]))]

  def batch_spec(self, global_batch_size: int, size: tuple[int, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The stored moments and per-encoder outputs, at their storage dtypes (the step casts them to float32).

    size: a bucket's (height, width) pixels (its latents' shape); None: the one stored shape, or (bucketed) the
    square latent of data.image_size.
    """
    m = self.manifest
    if size is not None:
      shape = precomputed.latent_shapes(m)[self.sizes.index(tuple(size))]
    elif self.sizes:
      shape = [self.image_size, self.image_size, precomputed.latent_shapes(m)[0][2]]
    else:
      shape = precomputed.latent_shapes(m)[0]  # The one stored shape.
    latent = jax.ShapeDtypeStruct((global_batch_size, *shape), precomputed.STORAGE_DTYPES[m["latent"]["dtype"]])
    text_dtype = precomputed.STORAGE_DTYPES[m["text"]["dtype"]]
    return {
        **{k: latent for k in precomputed.LATENT_KEYS},
        **{
            k: jax.ShapeDtypeStruct((global_batch_size, *shape), text_dtype)
            for k, shape in zip(self.text_keys, m["text"]["shapes"])
        },
    }

  def stored_inputs(self):
    """The static half of the step's precomputed path (step.StoredInputs)."""
    empty = None
    if self.drop_to == "empty":
      empty = tuple(precomputed.load_empty_prompt(self.path, self.manifest))
    return step_lib.StoredInputs(
        text_treedef=self.treedef,
        text_keys=tuple(self.text_keys),
        scaling_factor=self.vae_model.scaling_factor,
        shift_factor=self.vae_model.shift_factor,
        empty=empty,
    )
