"""The model registry: `config.model.arch` -> a Linen backbone, built from the config, and its dummy inputs.

One home for the architecture check and for the constructor arguments a config implies. The denoising backbones
(the MM-DiT and the paper's RQ2 baselines) live here; the autoencoder (model/vae.py) and the text encoders
(model/text/) are built by their own modules beside this one.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rflow_jax.model import baselines
from rflow_jax.model import mmdit
from rflow_jax.model import text_encoders

# Compute dtypes by config name (parameters are always stored in float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# config.model.arch -> class. Every class takes MMDiT's common constructor arguments and has its __call__ signature:
# (x (B, H, W, C), t (B,), context (B, L, context_dim), pooled (B, pooled_dim)) -> (B, H, W, out) float32.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mmdit": mmdit.MMDiT,
    "dit": baselines.DiT,
    "crossdit": baselines.CrossDiT,
    "uvit": baselines.UViT,
}


def check_arch(arch: str) -> None:
  """Raises ValueError naming `arch` and the valid names when it is not a registered backbone."""
  if arch not in ARCHITECTURES:
    raise ValueError(f"model.arch={arch!r}; valid: {sorted(ARCHITECTURES)}")


def build(arch: str, **kwargs: Any) -> nn.Module:
  """ARCHITECTURES[arch](**kwargs), after check_arch."""
  check_arch(arch)
  return ARCHITECTURES[arch](**kwargs)


def model_kwargs(config) -> dict[str, Any]:
  """Backbone constructor arguments: config.model (less `arch`) plus the widths the text stack dictates."""
  kwargs = dict(config.model)
  kwargs.pop("arch")
  kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  _, _, kwargs["context_dim"], kwargs["pooled_dim"] = text_encoders.dims(config.text)
  return kwargs


def build_model(config) -> nn.Module:
  """The backbone named by config.model.arch, built from config.model and config.text."""
  return build(config.model.arch, **model_kwargs(config))


def dummy_inputs(config, batch_size: int = 1):
  """Zero (x, t, context, pooled) of the shapes a config's backbone takes (for init and abstract shapes).

  The context and pooled shapes are the text stack's (text_encoders.dims): the encoders' tokens side by side on the
  sequence axis, as SD3 composes them.
  """
  s, m = config.data.image_size, config.model
  _, n_context, d_context, d_pooled = text_encoders.dims(config.text)
  x = jnp.zeros((batch_size, s, s, m.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.float32)
  context = jnp.zeros((batch_size, n_context, d_context), jnp.float32)
  pooled = jnp.zeros((batch_size, d_pooled), jnp.float32)
  return x, t, context, pooled
