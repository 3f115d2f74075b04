"""CLIP's text transformer (transformers' CLIPTextModel / CLIPTextModelWithProjection) in Linen.

SD3 uses two: OpenAI CLIP-L/14 (12 layers, width 768, quick_gelu) and OpenCLIP bigG/14 (32 layers, width 1280, exact
gelu), both with a text projection (arXiv 2403.03206, §B.2). The forward pass:

  x = token_embedding[ids] + position_embedding[:L]                      # hidden_states[0]
  x = x + attn(LN1(x), causal);  x = x + fc2(act(fc1(LN2(x))))           # per layer: hidden_states[i]
  last_hidden_state = final_LN(x)
  pooled = last_hidden_state[EOS position] (@ text_projection)

The EOS position follows transformers: configs with eos_token_id == 2 (written before transformers PR #24773) pool at
the argmax of the ids, since the real EOS (49407) is the largest id; newer configs pool at the first eos_token_id.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model import layers
from rflow_jax.model.text import common

_INIT = nn.initializers.normal(0.02)  # Random init only matters for tiny test stacks; real weights are loaded.


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of a CLIP text tower (the fields of transformers' CLIPTextConfig that change the function).

  Attributes:
    vocab_size: rows of the token embedding (49408 for CLIP-L and bigG).
    width: hidden_size.
    depth: num_hidden_layers.
    num_heads: num_attention_heads.
    mlp_dim: intermediate_size.
    max_length: max_position_embeddings (77).
    act: hidden_act, a key of common.ACTIVATIONS ("quick_gelu" for CLIP-L, "gelu" for bigG).
    eps: layer_norm_eps.
    eos_token_id: where `pooled` is read (see the module docstring for the legacy value 2).
    projection_dim: output width of text_projection; 0 = no projection (CLIPTextModel).
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_length: int = 77
  act: str = "quick_gelu"
  eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 0


def _layer_norm(eps: float, param_dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with affine params, computed and returned in float32."""
  return nn.LayerNorm(
      epsilon=eps,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
  )


class _Layer(nn.Module):
  """Pre-LN block: causal self-attention and an MLP, each with a residual."""

  cfg: CLIPTextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  def _norm(self, name):
    return _layer_norm(self.cfg.eps, self.param_dtype, name)

  def _dense(self, features, axes, name):
    return layers.Dense(features, axes, kernel_init=_INIT, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, bias):  # x (B, L, D); bias (L, L) causal
    cfg = self.cfg
    h = self._norm("layer_norm1")(x).astype(self.dtype)
    q = layers.split_heads(self._dense(cfg.width, ("embed", "heads"), "q_proj")(h), cfg.num_heads)  # (B, L, N, Dh)
    k = layers.split_heads(self._dense(cfg.width, ("embed", "heads"), "k_proj")(h), cfg.num_heads)
    v = layers.split_heads(self._dense(cfg.width, ("embed", "heads"), "v_proj")(h), cfg.num_heads)
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    o = common.attend(q * scale, k, v, bias)  # (B, L, N, Dh)
    o = o.reshape(o.shape[:2] + (cfg.width,))
    x = x + self._dense(cfg.width, ("heads", "embed"), "out_proj")(o)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    h = self._norm("layer_norm2")(x).astype(self.dtype)
    h = common.ACTIVATIONS[cfg.act](self._dense(cfg.mlp_dim, ("embed", "mlp"), "fc1")(h))  # (B, L, F)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return x + self._dense(cfg.width, ("mlp", "embed"), "fc2")(h)  # (B, L, D)


class CLIPText(nn.Module):
  """CLIP text tower: int32 ids (B, L) -> {"hidden_states", "last_hidden_state", "pooled"}.

  Attributes:
    cfg: the architecture.
    dtype: compute dtype (bfloat16 halves activations; LayerNorms and softmax stay float32).
    param_dtype: storage dtype of the params.
    scan_layers: nn.scan over the layers (compile time flat in depth; params stacked under "layers").
  """

  cfg: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = False

  @nn.compact
  def __call__(self, ids: jax.Array) -> dict:
    """Args: ids (B, L) int32 with L <= max_length. Returns: hidden_states (depth+1 arrays (B, L, D)), the final
    LayerNorm's output (B, L, D) and pooled (B, projection_dim or D)."""
    cfg = self.cfg
    length = ids.shape[1]
    if length > cfg.max_length:
      raise ValueError(f"CLIP ids have {length} tokens, more than max_position_embeddings={cfg.max_length}")
    tok = self.param(
        "token_embedding",
        nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        (cfg.vocab_size, cfg.width),
        self.param_dtype,
    )
    pos = self.param(
        "position_embedding",
        nn.with_logical_partitioning(_INIT, ("pos", "embed")),
        (cfg.max_length, cfg.width),
        self.param_dtype,
    )
    x = (jnp.take(tok, ids, axis=0) + pos[:length]).astype(self.dtype)  # (B, L, D)
    causal = common.mask_bias(jnp.tril(jnp.ones((length, length), bool)))  # (L, L)
    hidden = common.run_layers(
        _Layer, dict(cfg=cfg, dtype=self.dtype, param_dtype=self.param_dtype), cfg.depth, self.scan_layers, x, causal
    )
    last = _layer_norm(cfg.eps, self.param_dtype, "final_layer_norm")(hidden[-1])  # (B, L, D) float32
    pooled = jnp.take_along_axis(last, eos_positions(ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]  # (B, D)
    if cfg.projection_dim:
      pooled = layers.Dense(
          cfg.projection_dim,
          ("embed", "cond"),
          kernel_init=_INIT,
          use_bias=False,
          dtype=jnp.float32,
          param_dtype=self.param_dtype,
          name="text_projection",
      )(pooled)
    return {"hidden_states": hidden, "last_hidden_state": last, "pooled": pooled}


def eos_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
  """(B,) index of the token CLIP pools at, by transformers' rule (legacy argmax when eos_token_id == 2)."""
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


# SD3's text_encoder (OpenAI CLIP-L/14) and text_encoder_2 (OpenCLIP bigG/14), both with projections.
CLIP_L = CLIPTextConfig(
    vocab_size=49408, width=768, depth=12, num_heads=12, mlp_dim=3072, act="quick_gelu", projection_dim=768
)
CLIP_G = CLIPTextConfig(
    vocab_size=49408, width=1280, depth=32, num_heads=20, mlp_dim=5120, act="gelu", projection_dim=1280
)
