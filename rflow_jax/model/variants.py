"""Named MM-DiT sizes (depth -> width presets of the scaling family, the released SD3 / SD3.5 configs) and the
parameter count of a backbone.

These are configuration data and a shape-only measurement, not network code: configs, the scaling study and the
parameter-matched baselines read them, and `count_params` counts any backbone of model/registry.py (it traces
`model.init` abstractly), so they live apart from the Linen modules in model/mmdit.py.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _depth_variant(d: int) -> dict[str, Any]:
  return dict(depth=d, hidden_size=64 * d, num_heads=d)


# Named configurations. "dN": the paper's scaling family (width 64*d, d heads,
# head_dim 64); presets: the released SD3 / SD3.5 transformers (their diffusers configs).
VARIANTS: dict[str, dict[str, Any]] = {
    **{f"d{d}": _depth_variant(d) for d in range(2, 39)},
    "sd3-medium": dict(_depth_variant(24), pos_embed_max_size=192, qk_norm=None, dual_attention_layers=()),
    "sd3.5-medium": dict(
        _depth_variant(24), pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))
    ),
    "sd3.5-large": dict(_depth_variant(38), pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=()),
}


def variant(name: str) -> dict[str, Any]:
  """MMDiT constructor kwargs of a named variant ("d24", "sd3.5-large", ...).

  Args:
    name: a key of VARIANTS.

  Returns:
    A fresh dict, e.g. `mmdit.MMDiT(**variants.variant("d24"), in_channels=4)`.
  """
  if name not in VARIANTS:
    raise ValueError(f"unknown MMDiT variant {name!r}; known: " f"{sorted(VARIANTS)}")
  return dict(VARIANTS[name])


def count_params(
    model: nn.Module,
    x_shape: Sequence[int],
    context_shape: Sequence[int],
    pooled_shape: Sequence[int],
    include_pos_embed: bool = True,
) -> int:
  """Number of parameters, from abstract shapes (allocates nothing).

  Args:
    model: the module (an MMDiT, or any backbone with its __call__ signature).
    x_shape: (B, H, W, C) latent shape.
    context_shape: (B, L, context_dim).
    pooled_shape: (B, pooled_dim).
    include_pos_embed: count the (non-trained) positional table too.

  Returns:
    The parameter count.
  """
  f32 = lambda s: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), f32(x_shape), f32(x_shape[:1]), f32(context_shape), f32(pooled_shape)
  )["params"]
  shapes = nn.unbox(shapes)
  if not include_pos_embed:
    shapes = {k: v for k, v in shapes.items() if k != "pos_embed"}
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
