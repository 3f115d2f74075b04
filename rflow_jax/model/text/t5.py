"""The T5 v1.1 encoder (transformers' T5EncoderModel) in Linen.

SD3's third encoder is T5 v1.1 XXL (24 layers, d_model 4096, 64 heads of 64, d_ff 10240, gated gelu; ~4.7B params),
its final hidden states forming the long half of the context (arXiv 2403.03206, §B.2). The forward pass:

  x = embed[ids]                                                         # hidden_states[0]
  x = x + o(attn(q, k, v of RMS(x)) + position_bias + mask)              # no 1/sqrt(d) scaling, no biases
  x = x + wo(act(wi_0(RMS(x))) * wi_1(RMS(x)))   (gated)  or  wo(act(wi(RMS(x))))
  last_hidden_state = RMS_final(x)                                       # also hidden_states[-1], as transformers

RMS is T5's norm: x·rsqrt(mean(x²) + eps)·scale, no mean subtraction, no bias. The relative-position bias is one
(num_buckets, num_heads) table (stored in transformers' first layer) looked up once and added in every layer.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.model import layers
from rflow_jax.model.text import common

_INIT = nn.initializers.normal(0.05)  # Random init only matters for tiny test stacks; real weights are loaded.


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of a T5 encoder (the fields of transformers' T5Config that change the encoder's function).

  Attributes:
    vocab_size: rows of the token embedding (32128 for T5 v1.1).
    width: d_model.
    depth: num_layers.
    num_heads: num_heads.
    head_dim: d_kv (not necessarily width / num_heads).
    mlp_dim: d_ff.
    act: dense_act_fn, a key of common.ACTIVATIONS ("gelu_new" for v1.1's gated-gelu, "relu" for the original T5).
    gated: is_gated_act (feed_forward_proj starts with "gated-").
    num_buckets: relative_attention_num_buckets.
    max_distance: relative_attention_max_distance.
    eps: layer_norm_epsilon.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  act: str = "gelu_new"
  gated: bool = True
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(L, L) int32 bucket of key position j seen from query position i (bidirectional, as T5's encoder).

  Half the buckets are for keys after the query; within each half, distances below a quarter of num_buckets get one
  bucket each and larger ones share log-spaced buckets up to max_distance. Computed in float32 numpy (the bucket
  matrix depends only on L, so it is a compile-time constant) with the same float32 arithmetic as transformers.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # memory - query
  half = num_buckets // 2
  out = (rel > 0).astype(np.int64) * half
  n = np.abs(rel)
  max_exact = half // 2
  # Distances below max_exact take the exact branch; clamping them to 1 only keeps log() finite there.
  large = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
      math.log(max_distance / max_exact)
  )
  large = max_exact + (large * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (out + np.where(n < max_exact, n, large)).astype(np.int32)


class _Layer(nn.Module):
  """Pre-RMSNorm block: self-attention with the shared bias, then the (gated) feed-forward; no biases anywhere."""

  cfg: T5Config
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  def _dense(self, features, axes, name):
    return layers.Dense(
        features, axes, kernel_init=_INIT, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )

  def _norm(self, name):
    return layers.RMSNorm(eps=self.cfg.eps, axis_name="embed", param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, bias):  # x (B, L, D); bias (B or 1, N, L, L) float32
    cfg = self.cfg
    inner = cfg.num_heads * cfg.head_dim
    h = self._norm("attn_norm")(x).astype(self.dtype)
    q = layers.split_heads(self._dense(inner, ("embed", "heads"), "q")(h), cfg.num_heads)  # (B, L, N, Dh)
    k = layers.split_heads(self._dense(inner, ("embed", "heads"), "k")(h), cfg.num_heads)
    v = layers.split_heads(self._dense(inner, ("embed", "heads"), "v")(h), cfg.num_heads)
    o = common.attend(q, k, v, bias)  # T5 does not scale logits by 1/sqrt(Dh).
    x = x + self._dense(cfg.width, ("heads", "embed"), "o")(o.reshape(o.shape[:2] + (inner,)))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = self._norm("ff_norm")(x).astype(self.dtype)
    act = common.ACTIVATIONS[cfg.act]
    if cfg.gated:
      f = act(self._dense(cfg.mlp_dim, ("embed", "mlp"), "wi_0")(h)) * self._dense(
          cfg.mlp_dim, ("embed", "mlp"), "wi_1"
      )(h)
    else:
      f = act(self._dense(cfg.mlp_dim, ("embed", "mlp"), "wi")(h))
    f = nn.with_logical_constraint(f, ("batch", "length", "mlp"))  # (B, L, F)
    return x + self._dense(cfg.width, ("mlp", "embed"), "wo")(f)  # (B, L, D)


class T5Encoder(nn.Module):
  """T5 encoder: int32 ids (B, L) [, attention_mask (B, L)] -> {"hidden_states", "last_hidden_state"}.

  Attributes:
    cfg: the architecture.
    dtype: compute dtype (bfloat16; never float16, where T5's activations overflow). Norms and softmax are float32.
    param_dtype: storage dtype of the params.
    scan_layers: nn.scan over the layers (compile time flat in depth; params stacked under "layers").
  """

  cfg: T5Config
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = False

  @nn.compact
  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
    """Args: ids (B, L) int32; attention_mask (B, L), 1 = real token, or None (SD3 attends to padding too).
    Returns: hidden_states (depth+1 arrays (B, L, D), the last one normed) and last_hidden_state (B, L, D)."""
    cfg = self.cfg
    length = ids.shape[1]
    embed = self.param(
        "embed",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (cfg.vocab_size, cfg.width),
        self.param_dtype,
    )
    table = self.param(
        "relative_attention_bias",
        nn.with_logical_partitioning(_INIT, ("pos", None)),
        (cfg.num_buckets, cfg.num_heads),
        self.param_dtype,
    )
    x = jnp.take(embed, ids, axis=0).astype(self.dtype)  # (B, L, D)
    buckets = relative_buckets(length, cfg.num_buckets, cfg.max_distance)  # (L, L) constant
    bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None]  # (1, N, L, L)
    if attention_mask is not None:
      bias = bias + common.mask_bias(attention_mask[:, None, None, :].astype(bool))  # (B, N, L, L)
    hidden = common.run_layers(
        _Layer, dict(cfg=cfg, dtype=self.dtype, param_dtype=self.param_dtype), cfg.depth, self.scan_layers, x, bias
    )
    last = layers.RMSNorm(eps=cfg.eps, axis_name="embed", param_dtype=self.param_dtype, name="final_layer_norm")(
        hidden[-1]
    )
    return {"hidden_states": hidden[:-1] + (last,), "last_hidden_state": last}


# The encoder of google/t5-v1_1-xxl, SD3's text_encoder_3 (~4.76B parameters).
T5_V1_1_XXL = T5Config(vocab_size=32128, width=4096, depth=24, num_heads=64, head_dim=64, mlp_dim=10240)
