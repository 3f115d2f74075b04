"""RQ2 baseline backbones of SD3 (Esser et al. 2024 §5.2.3): DiT, CrossDiT, UViT.

All share MMDiT's interface, inputs and conditioning, so that a comparison
changes only how text and image tokens interact:

  __call__(x (B, H, W, C) NHWC, t (B,), context (B, L, context_dim),
           pooled (B, pooled_dim)) -> velocity (B, H, W, out) float32

and MMDiT's own front end (rflow_jax/model/frontend.py: patches + sin-cos
positions, time, pooled-text and context embeddings; same param names and
inits).

  DiT       Text and image tokens concatenated into ONE sequence processed by
            ONE set of weights per block (SD3's "DiT" baseline: MMDiT with
            shared stream weights). adaLN-zero modulation from
            c = t_emb + y_emb, exactly MMDiT's `Stream`. The last block only
            updates the image tokens (the text outputs would be discarded).
  CrossDiT  Image tokens only in the residual stream; per block: adaLN-zero
            self-attention, then cross-attention from the image tokens to the
            (embedded, never updated) text tokens, then the adaLN-zero MLP
            (PixArt-alpha's block, with per-block adaLN-zero instead of
            adaLN-single). The cross-attention residual is not gated; its
            output projection is zero-initialised instead (as PixArt does),
            so every block is the identity at init.
  UViT      Bao et al. 2023, "All are Worth Words": every input is a token of
            one sequence [t_token, pooled_token, context (L), image (T)];
            pre-LN transformer blocks (LayerNorm with affine params) without
            adaLN; long skip connections: block i of the second half sees
            Dense(concat(x, skip_i)) where skip_i is the output of the
            mirrored first-half block. depth blocks = depth // 2 "in" blocks,
            a middle block when depth is odd (U-ViT's layout exactly) and
            depth // 2 "out" blocks. Output: LayerNorm -> Dense -> unpatchify
            -> 3x3 conv (U-ViT's final conv). Choices that differ from U-ViT
            (for comparability with the other backbones): the time token is
            our t_embedder MLP of the 256-d sinusoid (U-ViT feeds the
            D-dim sinusoid), the pooled text vector is one more token (U-ViT
            has none), qkv projections have biases, GELU is the tanh
            approximation, only image tokens have positional embeddings, and
            Dense kernels use our xavier-uniform init (U-ViT: trunc_normal
            0.02).
            Without adaLN-zero, its output at init is not zero.

Every param carries logical-axis names from the vocabulary of
rflow_jax/sharding/rules.py. The registry is rflow_jax/model/registry.py;
parameter-matched widths are rflow_jax/model/param_matching.py.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model import frontend
from rflow_jax.model import layers
from rflow_jax.model import mmdit

_ZEROS = nn.initializers.zeros_init()


class _Backbone(nn.Module):
  """Attributes shared with MMDiT (same names, defaults and meaning).

  Attributes:
    patch_size: p; inputs are cut into p x p patches.
    in_channels: input channels C.
    out_channels: predicted channels; None means in_channels.
    hidden_size: width H.
    depth: number of blocks.
    num_heads: attention heads (head_dim = H / num_heads).
    mlp_ratio: MLP hidden width / H.
    context_dim: width of the input context tokens.
    pooled_dim: width of the pooled text vector.
    pos_embed_max_size: M of the (M*M, H) sin-cos table.
    qk_norm: None or "rms_norm" (per-head RMSNorm of q and k).
    dtype: compute dtype.
    param_dtype: storage dtype.
    remat: "none" or a key of mmdit.REMAT_POLICIES; rematerialises blocks.
    attention_impl: a key of layers.ATTENTION_IMPLS.
    pos_embed_base: grid units of the base resolution in the sin-cos init.
    dual_attention_layers: MMDiT-only; accepted so that one config.model
      builds any architecture, and must be empty.
    scan_blocks: MMDiT-only (blocks are not scanned here); must be False.
    residual_grad_barrier: on CPU, materialise the residual stream's gradient between blocks
      (layers.residual_grad_barrier says why).
  """

  patch_size: int = 2
  in_channels: int = 16
  out_channels: int | None = None
  hidden_size: int = 1536
  depth: int = 24
  num_heads: int = 24
  mlp_ratio: float = 4.0
  context_dim: int = 4096
  pooled_dim: int = 2048
  pos_embed_max_size: int = 192
  qk_norm: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  attention_impl: str = "einsum"
  pos_embed_base: int = 64
  dual_attention_layers: tuple[int, ...] = ()
  scan_blocks: bool = False
  residual_grad_barrier: bool = True

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  def check_config(self) -> None:
    """Raises ValueError naming the first inconsistent attribute."""
    layers.check_divisible("hidden_size", self.hidden_size, "num_heads", self.num_heads)
    layers.check_divisible("hidden_size", self.hidden_size, "4", 4)
    layers.check_in("qk_norm", self.qk_norm, mmdit.QK_NORMS)
    layers.check_in("remat", self.remat, mmdit.REMAT_CHOICES)
    layers.check_in("attention_impl", self.attention_impl, tuple(layers.ATTENTION_IMPLS))
    if self.depth < 1:
      raise ValueError(f"depth={self.depth} must be >= 1")
    name = type(self).__name__
    if self.dual_attention_layers:
      raise ValueError(
          f"dual_attention_layers={self.dual_attention_layers}:" f" {name} has no dual-attention blocks (MMDiT only)"
      )
    if self.scan_blocks:
      raise ValueError(f"scan_blocks=True: {name} does not scan its blocks " f"(MMDiT only); use remat to save memory")

  def _barrier(self, x: jax.Array) -> jax.Array:
    return layers.residual_grad_barrier(x) if self.residual_grad_barrier else x

  def _remat(self, block_cls):
    if self.remat == "none":
      return block_cls
    return nn.remat(block_cls, policy=mmdit.REMAT_POLICIES[self.remat])

  def _dense(self, features, axes, name, **kwargs) -> layers.Dense:
    return layers.Dense(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kwargs)


class DiTBlock(mmdit.Stream):
  """One MMDiT stream applied to the whole [image; text] sequence.

  Attributes:
    num_outputs: only the first num_outputs tokens (the image) are updated
      and returned; None updates all (every block but the last).
  """

  num_outputs: int | None = None

  def __call__(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
    """tokens (B, T+L, H), c (B, H) -> (B, T+L or num_outputs, H)."""
    qkv, mods = self.pre_attention(tokens, c)
    (out,) = layers.joint_attention([qkv], self.attention_impl, [self.attn.qk_scales()])
    n = tokens.shape[1] if self.num_outputs is None else self.num_outputs
    return frontend.constrain(self.post_attention(tokens[:, :n], out[:, :n], mods))


class DiT(_Backbone):
  """DiT baseline: one weight set over concatenated text and image tokens."""

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
    """Predicts the velocity; see the module docstring for the interface."""
    self.check_config()
    tokens, h, w = frontend.image_tokens(self, x)  # (B, T, H)
    c = frontend.time_embedding(self, t) + frontend.pooled_embedding(self, pooled)  # (B, H) float32
    # Image tokens first, so that the last block can keep just them.
    seq = jnp.concatenate([tokens, frontend.context_tokens(self, context)], axis=1)
    n_img = tokens.shape[1]
    block = self._remat(DiTBlock)
    for i in range(self.depth):
      seq = block(
          self.hidden_size,
          self.num_heads,
          self.mlp_ratio,
          self.qk_norm,
          pre_only=False,
          dual_attention=False,
          attention_impl=self.attention_impl,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          num_outputs=n_img if i == self.depth - 1 else None,
          name=f"blocks_{i}",
      )(
          self._barrier(seq), c
      )  # (B, T+L, H); (B, T, H) after last
    out = mmdit.FinalLayer(
        self.patch_size**2 * self.output_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="final_layer"
    )(seq, c)
    return frontend.unpatchify(self, out, h, w).astype(jnp.float32)


class CrossAttention(nn.Module):
  """Attention from x's tokens (queries) to context tokens (keys, values).

  The output projection is zero-initialised, so an ungated residual
  x + CrossAttention(x, ctx) is the identity at init.
  """

  hidden_size: int
  num_heads: int
  qk_norm: str | None
  attention_impl: str
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array) -> jax.Array:
    """x (B, T, H), ctx (B, L, H) -> (B, T, H)."""
    dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = layers.split_heads(dense(self.hidden_size, ("embed", "heads"), name="q")(x), self.num_heads)  # (B, T, N, D)
    kv = layers.split_heads(
        dense(
            (2, self.hidden_size),
            ("embed", None, "heads"),
            kernel_init=layers.xavier_uniform(num_out_axes=2),
            name="kv",
        )(ctx),
        self.num_heads,
    )  # (B, L, 2, N, D)
    k, v = kv[:, :, 0], kv[:, :, 1]
    if self.qk_norm == "rms_norm":
      q = layers.RMSNorm(param_dtype=self.param_dtype, name="q_norm")(q)
      k = layers.RMSNorm(param_dtype=self.param_dtype, name="k_norm")(k)
    out = layers.dot_product_attention(q, k, v, self.attention_impl)
    out = out.reshape(out.shape[:2] + (self.hidden_size,))  # (B, T, H)
    return dense(self.hidden_size, ("heads", "embed"), kernel_init=_ZEROS, name="proj")(out)


class CrossDiTBlock(nn.Module):
  """adaLN-zero self-attention, ungated cross-attention, adaLN-zero MLP."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qk_norm: str | None
  attention_impl: str
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, c: jax.Array) -> jax.Array:
    """x (B, T, H), ctx (B, L, H), c (B, H) float32 -> (B, T, H)."""
    width = self.hidden_size
    mods = layers.Dense(
        6 * width,
        ("embed", "modulation"),
        kernel_init=_ZEROS,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        name="modulation",
    )(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)  # 6 x (B, H) float32
    attn = mmdit.Attention(
        width, self.num_heads, self.qk_norm, has_out=True, dtype=self.dtype, param_dtype=self.param_dtype, name="attn"
    )
    h = layers.modulate(layers.layer_norm(x), shift_msa, scale_msa)
    h = attn.self_attention(h.astype(self.dtype), self.attention_impl)
    # Residual arithmetic in float32, as in MMDiT's streams.
    x = x.astype(jnp.float32) + gate_msa[:, None] * h.astype(jnp.float32)
    h = CrossAttention(
        width,
        self.num_heads,
        self.qk_norm,
        self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="cross_attn",
    )(layers.layer_norm(x).astype(self.dtype), ctx)
    x = x + h.astype(jnp.float32)
    h = layers.modulate(layers.layer_norm(x), shift_mlp, scale_mlp)
    h = layers.Mlp(int(width * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
        h.astype(self.dtype)
    )  # (B, T, H)
    x = x + gate_mlp[:, None] * h.astype(jnp.float32)
    return frontend.constrain(x.astype(self.dtype))


class CrossDiT(_Backbone):
  """CrossDiT baseline: image tokens cross-attend to fixed text tokens."""

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
    """Predicts the velocity; see the module docstring for the interface."""
    self.check_config()
    tokens, h, w = frontend.image_tokens(self, x)  # (B, T, H)
    c = frontend.time_embedding(self, t) + frontend.pooled_embedding(self, pooled)  # (B, H) float32
    ctx = frontend.context_tokens(self, context)  # (B, L, H)
    block = self._remat(CrossDiTBlock)
    for i in range(self.depth):
      tokens = block(
          self.hidden_size,
          self.num_heads,
          self.mlp_ratio,
          self.qk_norm,
          self.attention_impl,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"blocks_{i}",
      )(
          self._barrier(tokens), ctx, c
      )  # (B, T, H)
    out = mmdit.FinalLayer(
        self.patch_size**2 * self.output_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="final_layer"
    )(tokens, c)
    return frontend.unpatchify(self, out, h, w).astype(jnp.float32)


class LayerNorm(nn.Module):
  """LayerNorm with learnable scale and bias ("embed"), float32 inside."""

  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (width,), self.param_dtype
    )
    bias = self.param("bias", nn.with_logical_partitioning(_ZEROS, ("embed",)), (width,), self.param_dtype)
    y = layers.layer_norm(x) * scale.astype(jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


class UViTBlock(nn.Module):
  """U-ViT block: [long-skip Dense], pre-LN attention, pre-LN MLP.

  Attributes:
    skip: the block of the second half, fed concat(x, skip) through
      Dense(2H -> H) first (U-ViT's skip_linear).
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qk_norm: str | None
  attention_impl: str
  skip: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    """x (B, S, H) [, skip (B, S, H)] -> (B, S, H)."""
    width = self.hidden_size
    if self.skip:
      # The 2H concat acts like an MLP hidden width: "mlp" shards it the way
      # fc2's input is sharded (and "embed" twice in one kernel could not be).
      x = layers.Dense(width, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="skip")(
          jnp.concatenate([x, skip], axis=-1)
      )  # (B, S, H)
    attn = mmdit.Attention(
        width, self.num_heads, self.qk_norm, has_out=True, dtype=self.dtype, param_dtype=self.param_dtype, name="attn"
    )
    h = LayerNorm(param_dtype=self.param_dtype, name="norm1")(x)
    h = attn.self_attention(h.astype(self.dtype), self.attention_impl)
    x = x.astype(jnp.float32) + h.astype(jnp.float32)
    h = LayerNorm(param_dtype=self.param_dtype, name="norm2")(x)
    h = layers.Mlp(int(width * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
        h.astype(self.dtype)
    )
    return frontend.constrain((x + h.astype(jnp.float32)).astype(self.dtype))


class UViT(_Backbone):
  """U-ViT baseline: all inputs as tokens, long skips, no adaLN."""

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
    """Predicts the velocity; see the module docstring for the interface."""
    self.check_config()
    tokens, h, w = frontend.image_tokens(self, x)  # (B, T, H)
    extras = jnp.stack([frontend.time_embedding(self, t), frontend.pooled_embedding(self, pooled)], axis=1).astype(
        self.dtype
    )  # (B, 2, H)
    seq = jnp.concatenate([extras, frontend.context_tokens(self, context), tokens], axis=1)  # (B, 2+L+T, H)
    block = functools.partial(
        self._remat(UViTBlock),
        self.hidden_size,
        self.num_heads,
        self.mlp_ratio,
        self.qk_norm,
        self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    half = self.depth // 2
    skips = []
    for i in range(half):
      seq = block(skip=False, name=f"in_blocks_{i}")(self._barrier(seq))
      skips.append(seq)
    if self.depth % 2:
      seq = block(skip=False, name="mid_block")(self._barrier(seq))
    for i in range(half):
      seq = block(skip=True, name=f"out_blocks_{i}")(self._barrier(seq), skips.pop())
    seq = LayerNorm(param_dtype=self.param_dtype, name="norm")(seq)
    out = self._dense(self.patch_size**2 * self.output_channels, ("embed", "patch"), "decoder_pred")(
        seq[:, -tokens.shape[1] :]
    )
    out = frontend.unpatchify(self, out, h, w)  # (B, H, W, out)
    c = self.output_channels
    # U-ViT's final 3x3 conv smooths patch seams; tiny, so left replicated.
    out = nn.Conv(
        c,
        (3, 3),
        padding="SAME",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None)),
        bias_init=nn.with_logical_partitioning(_ZEROS, (None,)),
        name="final_conv",
    )(out)
    return out.astype(jnp.float32)


# Constructor arguments every architecture accepts (MMDiT's common ones; see _Backbone).
COMMON_FIELDS = frozenset(f.name for f in dataclasses.fields(_Backbone)) - {"parent", "name"}
