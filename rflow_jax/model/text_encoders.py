"""Text conditioning, chosen by `config.text.encoders`: "tiny" stand-ins (below) or SD3's real encoders ("sd3").

"sd3" is rflow_jax/model/text/: CLIP-L, OpenCLIP bigG and T5 v1.1 composed as SD3 does, from released weights
(`text.sd3_path`) or, with no path, the same architectures at tiny size with random frozen weights, so that a CPU run
goes through the real code. Both choices share this module's interface: `build` -> (tokenizer, stack),
`init_params`, `drop_and_compose`, `negative_condition`, and `dims` for the backbone's input widths.

"tiny": a word tokenizer and two tiny frozen encoders standing in for CLIP and T5.

Real CLIP/T5 weights cannot be downloaded where rflow_jax is tested, so the built-in tasks use two tiny transformers,
randomly initialised from `config.text.init_seed` and never trained (like the paper's frozen encoders, so their outputs
could be precomputed). They are composed exactly as SD3 composes CLIP-L/G and T5 (arXiv 2403.03206, §B.2):

  * "clip": causal transformer; context = penultimate layer's hidden states (no final norm); pooled = final-norm
    hidden state at the EOS token.
  * "t5": bidirectional transformer; context = final-norm hidden states.
  * context = concat([clip_ctx, t5_ctx], axis=sequence)  # (B, 2L, D); pooled = clip_pooled  # (B, D)

Each encoder's output is dropped independently with probability `drop_prob` during training (the paper's caption
dropout for classifier-free guidance): zeroed (text.drop_to="zeros"), so the unconditional input at sampling time is
all zeros, matching what training saw; or replaced by the empty prompt's output of that encoder (text.drop_to="empty"),
and the unconditional input is the empty prompt. The interface (tokens -> (context (B, T, D), pooled (B, P))) is the one the real encoders will have.
"""

import os
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.model.text import clip, sd3, sd3_tokenizer, t5

ENCODERS = ("tiny", "sd3")  # Values of config.text.encoders.
DROP_TO = ("zeros", "empty")  # Values of config.text.drop_to: what a dropped encoder gives.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # Values of config.text.dtype.
PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Every word the shapes task can say, in both caption styles; anything else becomes <unk>.
_WORDS = (
    ",",
    "a",
    "an",
    "the",
    "of",
    "to",
    "left",
    "right",
    "above",
    "below",
    "and",
    "one",
    "two",
    "three",
    "red",
    "green",
    "blue",
    "yellow",
    "magenta",
    "cyan",
    "circle",
    "square",
    "triangle",
    "circles",
    "squares",
    "triangles",
)
_TOKEN_RE = re.compile(r"[a-z]+|,")


class WordTokenizer:
  """Lower-cases, splits into words and commas, maps to ids: [BOS, words..., EOS, PAD...] of fixed length.

  Picklable (grain workers call it) and pure numpy.
  """

  def __init__(self, max_length: int):
    if max_length < 3:
      raise ValueError(f"text.max_length must be >= 3 (BOS, a word, EOS), got {max_length!r}")
    self.max_length = max_length
    self.vocab = _SPECIALS + _WORDS
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __call__(self, text: str) -> np.ndarray:
    words = _TOKEN_RE.findall(text.lower())[: self.max_length - 2]  # Truncate, keeping room for BOS/EOS.
    ids = [BOS] + [self._ids.get(w, UNK) for w in words] + [EOS]
    out = np.full((self.max_length,), PAD, np.int32)
    out[: len(ids)] = ids
    return out

  def problems(self, text: str) -> list[str]:
    """What of `text` the encoders will not see: words outside the vocabulary (read as <unk>), and the words cut
    because the prompt is longer than max_length - 2 words. Empty when the prompt is represented exactly."""
    words = _TOKEN_RE.findall(text.lower())
    out = []
    unknown = [w for w in dict.fromkeys(words) if w not in self._ids]
    if unknown:
      out.append(f"words not in the vocabulary, read as <unk>: {', '.join(unknown)}")
    if len(words) > self.max_length - 2:
      cut = words[self.max_length - 2 :]
      out.append(
          f"cut at text.max_length={self.max_length} ({self.max_length - 2} words): " f"'{' '.join(cut)}' is dropped"
      )
    return out

  def batch(self, texts: Sequence[str]) -> np.ndarray:
    return np.stack([self(t) for t in texts]) if texts else np.zeros((0, self.max_length), np.int32)


class _Block(nn.Module):
  """Pre-LN transformer block (attention + GELU MLP)."""

  num_heads: int
  causal: bool

  @nn.compact
  def __call__(self, x):  # (B, L, D)
    width = x.shape[-1]
    h = nn.LayerNorm(name="ln1")(x)
    mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(4 * width, name="fc1")(h)
    h = nn.Dense(width, name="fc2")(nn.gelu(h))
    return x + h


class TinyEncoder(nn.Module):
  """Token embedding + learned positions + `depth` blocks; returns (all hidden states, final-normed states)."""

  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int
  causal: bool

  @nn.compact
  def __call__(self, tokens):  # (B, L) int32
    # Unit-variance embeddings (not the usual 0.02): the encoder is never trained, and a large token signal keeps
    # words distinguishable after the random blocks.
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(1.0), name="tok")(tokens)
    x = x + self.param("pos", nn.initializers.normal(1.0), (self.max_length, self.width))[: tokens.shape[1]]
    hidden = [x]
    for i in range(self.depth):
      x = _Block(self.num_heads, self.causal, name=f"block{i}")(x)
      hidden.append(x)
    return hidden, nn.LayerNorm(name="ln_final")(x)  # (B, L, D) each


class TextStack(nn.Module):
  """The SD3-style composition of a CLIP-like and a T5-like tiny encoder.

  Returns a list of (context, pooled) per encoder, pooled None for T5 — compose them with `compose`, after caption
  dropout, so that dropout acts per encoder as in the paper.
  """

  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int

  @nn.compact
  def __call__(self, tokens):  # (B, L)
    kw = dict(
        vocab_size=self.vocab_size,
        max_length=self.max_length,
        width=self.width,
        depth=self.depth,
        num_heads=self.num_heads,
    )
    clip_hidden, clip_final = TinyEncoder(causal=True, name="clip", **kw)(tokens)
    eos_pos = jnp.argmax(tokens == EOS, axis=-1)  # (B,) first EOS, like CLIP's pooled output.
    pooled = jnp.take_along_axis(clip_final, eos_pos[:, None, None], axis=1)[:, 0]  # (B, D)
    _, t5_final = TinyEncoder(causal=False, name="t5", **kw)(tokens)
    # Penultimate layer for CLIP, as SD3 (hidden_states[-2]).
    return [(clip_hidden[-2], pooled), (t5_final, None)]


def drop_and_compose(outputs, key, drop_prob: float, empty=None):
  """Applies per-encoder caption dropout and composes the SD3 conditioning.

  Args:
    outputs: TextStack output: [(clip_ctx (B, L, D), clip_pooled (B, D)), (t5_ctx (B, L, D), None)], or an
      SD3TextStack's dict (composed by sd3.compose: three encoders, three independent draws).
    key: PRNG key for the dropout draws, or None for no dropout.
    drop_prob: probability of dropping each encoder's output, independently per example.
    empty: the stack's outputs for the empty prompt (batch 1; `empty_outputs`): a dropped encoder gives them
      (text.drop_to="empty"); None: zeros (text.drop_to="zeros").

  Returns:
    context (B, 2L, D) and pooled (B, D), float32.
  """
  if isinstance(outputs, dict):
    return sd3.compose(outputs, key, drop_prob, empty)
  contexts, pooled = [], None
  for i, (ctx, pool) in enumerate(outputs):
    keep = jnp.ones((ctx.shape[0],), ctx.dtype)
    if key is not None and drop_prob > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - drop_prob, keep.shape).astype(ctx.dtype)
    e_ctx, e_pool = (None, None) if empty is None else empty[i]
    contexts.append(sd3.drop(ctx, keep, e_ctx))
    if pool is not None:
      pooled = sd3.drop(pool, keep, e_pool)
  return jnp.concatenate(contexts, axis=1), pooled


def empty_outputs(text_stack, text_params, empty_tokens):
  """The stack's outputs for the empty prompt (batch 1): what a dropped encoder gives under text.drop_to="empty"."""
  return text_stack.apply({"params": text_params}, jnp.asarray(empty_tokens, jnp.int32).reshape(1, -1))


def null_condition(outputs):
  """The unconditional input for classifier-free guidance: every encoder dropped (all zeros), as in training."""
  context, pooled = drop_and_compose(outputs, None, 0.0)
  return jnp.zeros_like(context), jnp.zeros_like(pooled)


def negative_condition(text_stack, text_params, cond, empty_tokens=None):
  """The classifier-free-guidance negative for `cond` = (context, pooled) of a batch.

  "tiny": all zeros (every encoder dropped), as training saw it, or with `empty_tokens` (text.drop_to="empty") the
  empty prompt's encoding. "sd3": the empty prompt's encoding, as SD3's sampler and diffusers use it.
  """
  if isinstance(text_stack, sd3.SD3TextStack):
    return sd3.negative(text_stack, text_params, cond[0].shape[0])
  if empty_tokens is not None:
    context, pooled = drop_and_compose(empty_outputs(text_stack, text_params, empty_tokens), None, 0.0)
    return jnp.broadcast_to(context, cond[0].shape), jnp.broadcast_to(pooled, cond[1].shape)
  return jax.tree.map(jnp.zeros_like, cond)


def drop_tokens(text_config, tokenizer):
  """The empty prompt's tokens (a tuple) when text.drop_to="empty", else None (dropped encoders give zeros)."""
  # .get: workdirs written before text.drop_to existed dropped to zeros.
  return tuple(int(t) for t in tokenizer.batch([""])[0]) if text_config.get("drop_to", "zeros") == "empty" else None


def build(text_config):
  """Builds the tokenizer and the frozen encoder stack from `config.text`."""
  if text_config.encoders == "sd3":
    return _build_sd3(text_config)
  tokenizer = WordTokenizer(text_config.max_length)
  stack = TextStack(
      vocab_size=tokenizer.vocab_size,
      max_length=text_config.max_length,
      width=text_config.width,
      depth=text_config.depth,
      num_heads=text_config.num_heads,
  )
  return tokenizer, stack


def _build_sd3(text_config):
  """SD3's tokenizers and stack: from `sd3_path`, or tiny (text.width/depth/num_heads, T5 twice as wide)."""
  overrides = dict(dtype=DTYPES[text_config.dtype], scan_layers=text_config.scan_layers)
  if text_config.sd3_path:
    # Reading a Hugging Face directory is the export package's job; imported here only when a path is given.
    from rflow_jax.export import text as export_text  # pylint: disable=g-import-not-at-top

    return export_text.sd3_stack(text_config.sd3_path, text_config.t5_length, text_config.use_t5, **overrides)
  tok_l = sd3_tokenizer.tiny_clip_tokenizer(_WORDS)  # CLIP-L pads with EOS, bigG with "!", as SD3's tokenizers.
  tok_g = sd3_tokenizer.tiny_clip_tokenizer(_WORDS, pad_token="!")
  tok_t5 = sd3_tokenizer.tiny_t5_tokenizer(_WORDS) if text_config.use_t5 else None
  tokenizer = sd3_tokenizer.SD3Tokenizer(tok_l, tok_g, tok_t5, text_config.t5_length)
  w, d, h = text_config.width, text_config.depth, text_config.num_heads
  towers = [
      clip.CLIPText(
          clip.CLIPTextConfig(
              vocab_size=len(tok_l),
              width=w,
              depth=d,
              num_heads=h,
              mlp_dim=4 * w,
              act=act,
              eos_token_id=tok_l.eos_token_id,
              projection_dim=w,
          ),
          **overrides,
      )
      for act in ("quick_gelu", "gelu")
  ]
  t5_encoder = (
      t5.T5Encoder(
          t5.T5Config(vocab_size=len(tok_t5), width=2 * w, depth=d, num_heads=h, head_dim=2 * w // h, mlp_dim=4 * w),
          **overrides,
      )
      if tok_t5
      else None
  )
  stack = sd3.SD3TextStack(
      *towers, t5_encoder, t5_length=text_config.t5_length, context_width=2 * w, empty_tokens=tokenizer.empty()
  )
  return tokenizer, stack


def dims(text_config) -> tuple[int, int, int, int]:
  """(token columns per prompt, context tokens, context width, pooled width) of `config.text`'s stack."""
  if text_config.encoders == "tiny":
    return text_config.max_length, 2 * text_config.max_length, text_config.width, text_config.width
  if not text_config.sd3_path:
    w, n = text_config.width, sd3.CLIP_LENGTH + text_config.t5_length
    return sd3.CLIP_LENGTH + n, n, 2 * w, 2 * w
  _, stack = build(text_config)
  tokens, width, pooled = sd3.dims(stack)
  return sd3.CLIP_LENGTH + tokens, tokens, width, pooled


def init_params(stack, text_config):
  """The frozen encoders' weights: a pure function of `config.text` (and stored in checkpoints anyway).

  "sd3" with a path: the released weights, wrapped in the logical-axis boxes of random init so that they shard
  like any other param (T5-XXL over fsdp).
  """
  length = dims(text_config)[0]
  tokens = jnp.zeros((1, length), jnp.int32)
  if text_config.encoders == "sd3" and text_config.sd3_path:
    from rflow_jax.export import text as export_text  # pylint: disable=g-import-not-at-top

    boxed = jax.eval_shape(stack.init, jax.random.key(0), tokens)["params"]
    loaded = export_text.sd3_params(text_config.sd3_path, stack)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree.map(
        lambda box, value: box.replace_boxed(jnp.asarray(value)) if is_box(box) else value,
        boxed,
        loaded,
        is_leaf=is_box,
    )
  return stack.init(jax.random.key(text_config.init_seed), tokens)["params"]


def validate(text_config) -> None:
  """Raises ValueError naming a bad `config.text` choice (called by config validation, before any work)."""
  if text_config.encoders not in ENCODERS:
    raise ValueError(f"text.encoders={text_config.encoders!r}; valid: {ENCODERS}")
  if text_config.drop_to not in DROP_TO:
    raise ValueError(f"text.drop_to={text_config.drop_to!r}; valid: {DROP_TO}")
  if text_config.dtype not in DTYPES:
    raise ValueError(f"text.dtype={text_config.dtype!r}; valid: {sorted(DTYPES)}")
  if text_config.t5_length <= 0:
    raise ValueError(f"text.t5_length={text_config.t5_length} must be positive")
  if text_config.sd3_path and not os.path.isdir(text_config.sd3_path):
    raise FileNotFoundError(f"text.sd3_path={text_config.sd3_path!r} is not a directory")
