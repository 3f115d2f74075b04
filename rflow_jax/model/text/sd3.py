"""SD3's text conditioning: CLIP-L, OpenCLIP bigG and T5 composed into (context, pooled) (arXiv 2403.03206, §B.2).

  clip    = concat([CLIP-L hidden_states[-2], CLIP-G hidden_states[-2]], channels)   # (B, 77, 768 + 1280)
  context = concat([zero_pad(clip, to T5's width), T5 last_hidden_state], tokens)    # (B, 77 + T, 4096)
  pooled  = concat([CLIP-L pooled, CLIP-G pooled], channels)                         # (B, 768 + 1280)

The penultimate CLIP layers are taken before the final LayerNorm; pooled is each tower's projected EOS state
(`text_embeds`); T5 sees no attention mask. This is what diffusers' StableDiffusion3Pipeline.encode_prompt computes
(tests/text_sd3_test.py checks equality). T5 may be left out (`t5=None`): its tokens are then zeros, as diffusers does
without text_encoder_3, which saves 4.7B parameters at inference for some loss in prompt following and typography.

Training zeroes each encoder's whole output independently with probability drop_prob (0.463 in the paper, so that all
three are dropped together ~10% of the time); classifier-free guidance uses the empty prompt's encoding as its
negative, as the reference sampler and diffusers do.

Tokens reach the stack as one int32 array (B, 77 + 77 + T): CLIP-L ids, CLIP-G ids, T5 ids (sd3_tokenizer.py), so the
trainer and sampler pass text around as a single array whatever the stack.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model.text import clip, t5

CLIP_LENGTH = 77  # Tokens of each CLIP tower (its position table).
ENCODERS = ("clip_l", "clip_g", "t5")  # Order of the per-encoder dropout draws and of the token segments.


class SD3TextStack(nn.Module):
  """The three frozen encoders: tokens (B, 2·clip_length + t5_length) -> per-encoder outputs for `compose`.

  Attributes:
    clip_l: the CLIP-L tower (CLIPTextModelWithProjection).
    clip_g: the OpenCLIP bigG tower (CLIPTextModelWithProjection).
    t5: the T5 encoder, or None for the T5-off mode (zeros of width context_width).
    t5_length: T5 tokens (diffusers' pipeline default 256; the paper trained with 77).
    context_width: width of the context = T5's d_model (4096), also when T5 is off.
    clip_length: tokens per CLIP tower (77).
    empty_tokens: the tokenized empty prompt (one row of the token layout), the CFG negative; () if unknown.
  """

  clip_l: clip.CLIPText
  clip_g: clip.CLIPText
  t5: t5.T5Encoder | None
  t5_length: int
  context_width: int
  clip_length: int = CLIP_LENGTH
  empty_tokens: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict:
    """Args: tokens (B, 2·clip_length + t5_length) int32. Returns {name: (context (B, T_i, D_i), pooled or None)}."""
    n = self.clip_length
    if tokens.shape[1] != 2 * n + self.t5_length:
      raise ValueError(f"SD3 tokens have {tokens.shape[1]} columns, expected {2 * n} CLIP + {self.t5_length} T5")
    out = {}
    for name, tower, ids in (("clip_l", self.clip_l, tokens[:, :n]), ("clip_g", self.clip_g, tokens[:, n : 2 * n])):
      res = tower(ids)
      out[name] = (res["hidden_states"][-2].astype(jnp.float32), res["pooled"].astype(jnp.float32))
    if self.t5 is None:
      t5_ctx = jnp.zeros((tokens.shape[0], self.t5_length, self.context_width), jnp.float32)
    else:
      t5_ctx = self.t5(tokens[:, 2 * n :])["last_hidden_state"].astype(jnp.float32)
    out["t5"] = (t5_ctx, None)
    return out


def drop(x: jax.Array, keep: jax.Array, empty: jax.Array | None = None) -> jax.Array:
  """Caption dropout of one encoder output x (B, ...): rows with keep 0 become zeros, or `empty` (the empty prompt's
  output, batch 1) when given."""
  keep = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
  return x * keep if empty is None else jnp.where(keep > 0, x, empty.astype(x.dtype))


def compose(
    outputs: dict, key: jax.Array | None = None, drop_prob: float = 0.0, empty: dict | None = None
) -> tuple[jax.Array, jax.Array]:
  """Per-encoder caption dropout, then SD3's composition.

  Args:
    outputs: SD3TextStack's output.
    key: PRNG key of the dropout draws (encoder i uses fold_in(key, i)), or None for no dropout.
    drop_prob: probability of dropping each encoder's output, independently per example and encoder.
    empty: SD3TextStack's output for the empty prompt (batch 1): a dropped encoder gives it instead of zeros.

  Returns:
    context (B, clip_length + t5_length, context_width) and pooled (B, D_l + D_g), float32.
  """
  batch = outputs["t5"][0].shape[0]
  keep = {}
  for i, name in enumerate(ENCODERS):
    keep[name] = jnp.ones((batch,), jnp.float32)
    if key is not None and drop_prob > 0:
      keep[name] = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - drop_prob, (batch,)).astype(jnp.float32)
  e = {name: (None, None) for name in ENCODERS} if empty is None else empty
  (l_ctx, l_pool), (g_ctx, g_pool), (t5_ctx, _) = (outputs[name] for name in ENCODERS)
  clip_ctx = jnp.concatenate(
      [drop(l_ctx, keep["clip_l"], e["clip_l"][0]), drop(g_ctx, keep["clip_g"], e["clip_g"][0])], -1
  )
  width = t5_ctx.shape[-1]
  if clip_ctx.shape[-1] > width:
    raise ValueError(f"CLIP-L + CLIP-G width {clip_ctx.shape[-1]} exceeds the T5 width {width}")
  clip_ctx = jnp.pad(clip_ctx, ((0, 0), (0, 0), (0, width - clip_ctx.shape[-1])))  # (B, 77, width)
  context = jnp.concatenate([clip_ctx, drop(t5_ctx, keep["t5"], e["t5"][0])], axis=1)
  pooled = jnp.concatenate(
      [drop(l_pool, keep["clip_l"], e["clip_l"][1]), drop(g_pool, keep["clip_g"], e["clip_g"][1])], axis=-1
  )
  return context, pooled


def negative(stack: SD3TextStack, params, batch: int) -> tuple[jax.Array, jax.Array]:
  """The CFG negative: the empty prompt's (context, pooled), broadcast to `batch` rows."""
  if not stack.empty_tokens:
    raise ValueError("SD3TextStack.empty_tokens is empty: build the stack with its tokenizer's empty prompt")
  ids = jnp.asarray(stack.empty_tokens, jnp.int32)[None]  # (1, L)
  context, pooled = compose(stack.apply({"params": params}, ids))
  return (
      jnp.broadcast_to(context, (batch,) + context.shape[1:]),
      jnp.broadcast_to(pooled, (batch,) + pooled.shape[1:]),
  )


def dims(stack: SD3TextStack) -> tuple[int, int, int]:
  """(context tokens, context width, pooled width) the stack produces: the MM-DiT's input sizes."""
  pooled = stack.clip_l.cfg.projection_dim or stack.clip_l.cfg.width
  pooled += stack.clip_g.cfg.projection_dim or stack.clip_g.cfg.width
  return stack.clip_length + stack.t5_length, stack.context_width, pooled
