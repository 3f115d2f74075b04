"""MM-DiT backbone of Stable Diffusion 3 / 3.5 (Esser et al. 2024), Flax Linen.

Numerically the same function as diffusers' `SD3Transformer2DModel` (parity is
tested in tests/export_diffusers_test.py); weights convert exactly with
`rflow_jax.export.diffusers`. The param tree mirrors the original SD3 layout:

  pos_embed            (M*M, H) 2D sin-cos table. A *param* so that imported
                       tables replace it, but it is NOT meant to be trained:
                       the optimizer should freeze the top-level `pos_embed`.
  patch_embed          Dense(p*p*C -> H)  (a stride-p conv on patches)
  t_embedder/fc1,fc2   timestep MLP; y_embedder/fc1,fc2 pooled-text MLP
  context_embedder     Dense(context_dim -> H)
  blocks_{i}/x, blocks_{i}/context   the two streams of joint block i:
      modulation       Dense(H -> n*H), chunks (shift_msa, scale_msa,
                       gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2,
                       scale_msa2, gate_msa2]); (shift, scale) in the last
                       block's context stream.
      attn/qkv         Dense(H -> (3, H)); attn/q_norm, attn/k_norm RMSNorm;
      attn/proj        Dense(H -> H); attn2/... (dual-attention layers);
      mlp/fc1, mlp/fc2
  final_layer/modulation (shift, scale), final_layer/proj Dense(H -> p*p*out)

Images are NHWC; the output is the velocity v = eps - x0 in float32.

The block groups' names, scan stacking and depth growth are in
`rflow_jax.model.mmdit_tree`; named sizes and the parameter count in
`rflow_jax.model.variants`.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model import frontend
from rflow_jax.model import layers
from rflow_jax.model import mmdit_tree

QK_NORMS = (None, "rms_norm")

# `MMDiT.remat` -> jax.checkpoint policy (None: save nothing, recompute all).
REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none",) + tuple(REMAT_POLICIES)

_ZEROS = nn.initializers.zeros_init()


class Attention(nn.Module):
  """Projections of one attention (q, k, v with optional qk-norm, and out).

  The softmax itself happens in the caller because joint attention mixes the
  q/k/v of two streams.
  """

  hidden_size: int
  num_heads: int
  qk_norm: str | None
  has_out: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  def setup(self):
    self.qkv = layers.Dense(
        (3, self.hidden_size),
        ("embed", None, "heads"),
        kernel_init=layers.xavier_uniform(num_out_axes=2),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    if self.qk_norm == "rms_norm":
      self.q_norm = layers.RMSNorm(param_dtype=self.param_dtype)
      self.k_norm = layers.RMSNorm(param_dtype=self.param_dtype)
    if self.has_out:
      self.proj = layers.Dense(self.hidden_size, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype)

  def project_qkv(self, x: jax.Array) -> jax.Array:
    """(B, T, H) -> q, k, v stacked on axis 2: (B, T, 3, N, D), before the q/k-norm (see `qk_scales`)."""
    return layers.split_heads(self.qkv(x), self.num_heads)

  def qk_scales(self) -> jax.Array | None:
    """The q/k RMSNorm scales (2, D) that `layers.joint_attention` applies to project_qkv's q and k (None: no norm).

    The norm is applied there, not here, so that a kernel can fuse it (see `layers.joint_attention`).
    """
    if self.qk_norm != "rms_norm":
      return None
    head_dim = self.hidden_size // self.num_heads
    return jnp.stack([self.q_norm.scale(head_dim), self.k_norm.scale(head_dim)])

  def project_out(self, y: jax.Array) -> jax.Array:
    """(B, T, N, D) -> (B, T, H)."""
    return self.proj(y.reshape(y.shape[:2] + (self.hidden_size,)))

  def self_attention(self, x: jax.Array, impl: str) -> jax.Array:
    """(B, T, H) -> (B, T, H): projections, q/k-norm and attention over x's own tokens (needs has_out)."""
    (out,) = layers.joint_attention([self.project_qkv(x)], impl, [self.qk_scales()])
    return self.project_out(out)


class Stream(nn.Module):
  """One modality's weights in a joint block (the original's DismantledBlock).

  Attributes:
    pre_only: the last block's context stream: only q, k, v are computed and
      the modulation has 2 chunks (shift, scale).
    dual_attention: SD3.5 x stream with a second, image-only self-attention
      (9 modulation chunks).
  """

  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qk_norm: str | None
  pre_only: bool
  dual_attention: bool
  attention_impl: str
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  def setup(self):
    n = 2 if self.pre_only else (9 if self.dual_attention else 6)
    # adaLN-zero: a zero modulation makes every block the identity at init.
    self.modulation = layers.Dense(
        n * self.hidden_size,
        ("embed", "modulation"),
        kernel_init=_ZEROS,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
    )
    attn = functools.partial(
        Attention, self.hidden_size, self.num_heads, self.qk_norm, dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.attn = attn(has_out=not self.pre_only)
    if self.dual_attention:
      self.attn2 = attn(has_out=True)
    if not self.pre_only:
      self.mlp = layers.Mlp(int(self.hidden_size * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype)

  def pre_attention(self, x: jax.Array, c: jax.Array):
    """Modulated LayerNorm and q, k, v of the joint attention.

    Args:
      x: (B, T, H) stream tokens.
      c: (B, H) float32 conditioning (t_emb + y_emb).

    Returns:
      q, k, v stacked (B, T, 3, N, D) before the q/k-norm (applied by
      `layers.joint_attention` with `self.attn.qk_scales()`), and the modulation chunks [(B, H)]
      plus, for dual attention, the image self-attention output as the last
      item.
    """
    mods = jnp.split(
        self.modulation(nn.silu(c)), self.modulation.features // self.hidden_size, axis=-1
    )  # n x (B, H) float32
    normed = layers.layer_norm(x)  # (B, T, H) float32
    x_in = layers.modulate(normed, mods[0], mods[1]).astype(self.dtype)
    qkv = self.attn.project_qkv(x_in)
    if self.dual_attention:
      x_in2 = layers.modulate(normed, mods[6], mods[7]).astype(self.dtype)
      mods = mods + [self.attn2.self_attention(x_in2, self.attention_impl)]  # (B, T, H)
    return qkv, mods

  def post_attention(self, x: jax.Array, attn_out: jax.Array, mods: Sequence[jax.Array]) -> jax.Array:
    """Gated residual attention output, then the gated residual MLP.

    Args:
      x: (B, T, H) stream tokens before the block.
      attn_out: (B, T, N, D) this stream's slice of the joint attention.
      mods: second output of `pre_attention`.

    Returns:
      (B, T, H) updated tokens in `dtype`.
    """
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    h = self.attn.project_out(attn_out)  # (B, T, H)
    # Gating and residual adds in float32 (cheap, elementwise, fused by XLA).
    x = x.astype(jnp.float32) + gate_msa[:, None] * h.astype(jnp.float32)
    if self.dual_attention:
      x = x + mods[8][:, None] * mods[9].astype(jnp.float32)
    x_in = layers.modulate(layers.layer_norm(x), shift_mlp, scale_mlp)
    h = self.mlp(x_in.astype(self.dtype))  # (B, T, H)
    x = x + gate_mlp[:, None] * h.astype(jnp.float32)
    return x.astype(self.dtype)


class JointBlock(nn.Module):
  """MM-DiT block: two streams, one attention over their concatenated tokens."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float
  qk_norm: str | None
  context_pre_only: bool
  dual_attention: bool
  attention_impl: str
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, T, H), ctx (B, L, H), c (B, H) -> updated (x, ctx).

    The last block (context_pre_only) returns ctx unchanged: its context
    output is never used.
    """
    stream = functools.partial(
        Stream,
        self.hidden_size,
        self.num_heads,
        self.mlp_ratio,
        self.qk_norm,
        attention_impl=self.attention_impl,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    x_stream = stream(pre_only=False, dual_attention=self.dual_attention, name="x")
    ctx_stream = stream(pre_only=self.context_pre_only, dual_attention=False, name="context")
    x_qkv, x_mods = x_stream.pre_attention(x, c)
    ctx_qkv, ctx_mods = ctx_stream.pre_attention(ctx, c)
    # Image tokens first, as diffusers does (order is irrelevant without mask).
    qk_scales = [x_stream.attn.qk_scales(), ctx_stream.attn.qk_scales()]
    x_out, ctx_out = layers.joint_attention([x_qkv, ctx_qkv], self.attention_impl, qk_scales)
    x = x_stream.post_attention(x, x_out, x_mods)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if not self.context_pre_only:
      ctx = ctx_stream.post_attention(ctx, ctx_out, ctx_mods)
      ctx = nn.with_logical_constraint(ctx, ("batch", "length", "embed"))
    return x, ctx


class FinalLayer(nn.Module):
  """adaLN (shift, scale) on LayerNorm, then Dense(H -> p*p*out)."""

  patch_features: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    hidden = x.shape[-1]
    mods = layers.Dense(
        2 * hidden,
        ("embed", "modulation"),
        kernel_init=_ZEROS,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        name="modulation",
    )(
        nn.silu(c)
    )  # (B, 2H)
    shift, scale = jnp.split(mods, 2, axis=-1)
    x = layers.modulate(layers.layer_norm(x), shift, scale).astype(self.dtype)
    return layers.Dense(
        self.patch_features,
        ("embed", "patch"),
        kernel_init=_ZEROS,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="proj",
    )(x)


class MMDiT(nn.Module):
  """SD3 MM-DiT predicting the rectified-flow velocity.

  Attributes:
    patch_size: p; latents are cut into p x p patches.
    in_channels: latent channels C.
    out_channels: predicted channels; None means in_channels.
    hidden_size: model width H (64 * depth in the SD3 family).
    depth: number of joint blocks; the last one is context_pre_only.
    num_heads: attention heads (head_dim = H / num_heads).
    mlp_ratio: MLP hidden width / H.
    context_dim: width of the input context tokens (joint_attention_dim).
    pooled_dim: width of the pooled text vector.
    pos_embed_max_size: M; the (M*M, H) table is center-cropped to the patch
      grid.
    pos_embed_base: grid units of the base resolution in the sin-cos init
      (diffusers: sample_size // patch_size = 64 for SD3).
    qk_norm: None or "rms_norm" (per-head RMSNorm of q and k).
    dual_attention_layers: indices of SD3.5 blocks with a second image-only
      self-attention.
    dtype: compute dtype.
    param_dtype: storage dtype.
    scan_blocks: nn.scan over runs of identical blocks (see
      mmdit_tree.block_groups); the group's params get a leading layer axis
      (mmdit_tree.stack_blocks converts).
    remat: "none" or a key of REMAT_POLICIES; rematerialises each block.
    attention_impl: a key of layers.ATTENTION_IMPLS.
    residual_grad_barrier: on CPU, materialise the residual streams' gradient between unrolled blocks
      (layers.residual_grad_barrier says why); scanned runs have that boundary already.
    skip_layers: blocks that pass both streams through unchanged (diffusers' `skip_layers`): the second model of
      skip-layer guidance, applied with the same params; () for the model itself.
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
  dual_attention_layers: tuple[int, ...] = ()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_blocks: bool = False
  remat: str = "none"
  attention_impl: str = "einsum"
  residual_grad_barrier: bool = True
  pos_embed_base: int = 64
  skip_layers: tuple[int, ...] = ()

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  def check_config(self) -> None:
    """Raises ValueError naming the first inconsistent attribute."""
    layers.check_divisible("hidden_size", self.hidden_size, "num_heads", self.num_heads)
    layers.check_divisible("hidden_size", self.hidden_size, "4", 4)
    layers.check_in("qk_norm", self.qk_norm, QK_NORMS)
    layers.check_in("remat", self.remat, REMAT_CHOICES)
    layers.check_in("attention_impl", self.attention_impl, tuple(layers.ATTENTION_IMPLS))
    if self.depth < 1:
      raise ValueError(f"depth={self.depth} must be >= 1")
    for name in ("dual_attention_layers", "skip_layers"):
      bad = [i for i in getattr(self, name) if not 0 <= i < self.depth]
      if bad:
        raise ValueError(f"{name} {bad} outside [0, {self.depth})")

  def _block_class(self, scanned: bool):
    if self.remat == "none":
      return JointBlock
    # Inside scan the loop boundary already prevents XLA from CSE-ing the
    # recomputation away, and prevent_cse would block useful fusions.
    return nn.remat(JointBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=not scanned)

  def _blocks(self, tokens: jax.Array, ctx: jax.Array, c: jax.Array) -> jax.Array:
    """Runs the joint blocks, scanning runs of identical blocks if asked."""
    for start, stop in mmdit_tree.block_groups(self):
      scanned = self.scan_blocks and stop - start > 1
      block = self._block_class(scanned)(
          self.hidden_size,
          self.num_heads,
          self.mlp_ratio,
          self.qk_norm,
          context_pre_only=start == self.depth - 1,
          dual_attention=start in self.dual_attention_layers,
          attention_impl=self.attention_impl,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=mmdit_tree.block_name(start, stop),
      )
      if not scanned:  # A group of one block.
        if start not in self.skip_layers:
          if self.residual_grad_barrier:
            tokens, ctx = layers.residual_grad_barrier((tokens, ctx))
          tokens, ctx = block(tokens, ctx, c)
        continue
      # Params of the run are stacked on a new leading axis (logical name
      # None: layers are not sharded).
      scan = functools.partial(
          nn.scan,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          length=stop - start,
          metadata_params={nn.PARTITION_NAME: None},
      )
      skip = [i in self.skip_layers for i in range(start, stop)]
      if not any(skip):
        tokens, ctx = scan(lambda mdl, carry, c: (mdl(*carry, c), None), in_axes=nn.broadcast)(block, (tokens, ctx), c)[
            0
        ]
        continue
      # A skipped block inside a scanned run still runs (the scan body is one program); its output is dropped.
      body = lambda mdl, carry, c, s: (
          jax.tree.map(lambda old, new: jnp.where(s, old, new), carry, mdl(*carry, c)),
          None,
      )
      tokens, ctx = scan(body, in_axes=(nn.broadcast, 0))(block, (tokens, ctx), c, jnp.asarray(skip))[0]
    return tokens

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array) -> jax.Array:
    """Predicts the velocity.

    Args:
      x: (B, H, W, C) noisy latents x_t, NHWC.
      t: (B,) times in [0, 1] (0 data, 1 noise).
      context: (B, L, context_dim) text tokens.
      pooled: (B, pooled_dim) pooled text vector.

    Returns:
      (B, H, W, out_channels) float32 velocity.
    """
    self.check_config()
    p = self.patch_size
    tokens, h, w = frontend.image_tokens(self, x)  # (B, T, H)
    c = frontend.time_embedding(self, t) + frontend.pooled_embedding(self, pooled)  # (B, H)
    ctx = frontend.context_tokens(self, context)  # (B, L, H)

    tokens = self._blocks(tokens, ctx, c)  # (B, T, H)
    out = FinalLayer(p * p * self.output_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="final_layer")(
        tokens, c
    )  # (B, T, p*p*out)
    return frontend.unpatchify(self, out, h, w).astype(jnp.float32)  # (B, H, W, out)
