"""Pieces the CLIP and T5 text encoders share: biased softmax attention, activations, and the layer stack.

Both encoders return every hidden state, as transformers does with `output_hidden_states=True`; the layer stack runs
either as a Python loop (params `layers_0`, `layers_1`, ...) or as one `nn.scan` (params `layers`, each with a
leading layer axis), which compiles one layer instead of `depth` (T5-XXL: 24, bigG: 32).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# transformers' activation names -> functions: "gelu" is the exact erf form, "gelu_new"/"gelu_pytorch_tanh" the tanh
# approximation (T5 v1.1), "quick_gelu" x·σ(1.702x) (OpenAI CLIP).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
  """Softmax attention with an additive logit bias; no scaling (callers fold it into q, T5 has none).

  Args:
    q: queries (B, T, N, D).
    k: keys (B, S, N, D).
    v: values (B, S, N, D).
    bias: float32 logit bias broadcastable to (B, N, T, S) (causal mask, relative positions, padding), or None.

  Returns:
    (B, T, N, D) in the dtype of v; logits and softmax in float32 whatever the compute dtype.
  """
  logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnd->btnd", probs, v)


def mask_bias(keep: jax.Array) -> jax.Array:
  """(…, T, S) boolean "may attend" -> float32 additive bias: 0 where allowed, the float32 minimum elsewhere."""
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class _Scanned(nn.Module):
  """Adapter for nn.scan: one layer as (carry, broadcast) -> (carry, per-layer output)."""

  layer_cls: Any
  layer_kwargs: dict

  @nn.compact
  def __call__(self, x, bias):
    x = self.layer_cls(**self.layer_kwargs, name="layer")(x, bias)
    return x, x


def run_layers(
    layer_cls, layer_kwargs: dict, depth: int, scan: bool, x: jax.Array, bias: jax.Array | None
) -> tuple[jax.Array, ...]:
  """Applies `depth` layers to x (B, T, D); returns (x, out_1, ..., out_depth).

  Call it from a compact `__call__`: the layers it creates become that module's children.

  Args:
    layer_cls, layer_kwargs: the layer module and its attributes; it is called as layer(x, bias).
    depth: number of layers.
    scan: nn.scan over the layers (params under "layers", leading axis = layer, unsharded) instead of a loop.
    x: the embedding output.
    bias: attention logit bias shared by every layer (or None).

  Returns:
    The input and each layer's output, in order.
  """
  if not scan:
    outs = [x]
    for i in range(depth):
      outs.append(layer_cls(**layer_kwargs, name=f"layers_{i}")(outs[-1], bias))
    return tuple(outs)
  stack = nn.scan(
      _Scanned,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,),
      length=depth,
      metadata_params={nn.PARTITION_NAME: None},
  )
  _, ys = stack(layer_cls, layer_kwargs, name="layers")(x, bias)  # ys: (depth, B, T, D)
  return (x,) + tuple(ys[i] for i in range(depth))
