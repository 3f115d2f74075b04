"""Building blocks of the MM-DiT: Dense, norms, MLP, attention dispatch.

Every param is created through `nn.with_logical_partitioning` with names from
this small vocabulary (the sharding rules map them to mesh axes):

  "embed"       model width H (residual stream).
  "mlp"         hidden width of an MLP (4H in blocks, H in the embedder MLPs).
  "heads"       flattened num_heads * head_dim of q/k/v and the attention
                output projection's input.
  "kv"          head_dim (per-head RMSNorm scale).
  "modulation"  n * H outputs of an adaLN modulation Dense.
  "patch"       p * p * C features of a patch (patch-embed input, final
                projection output).
  "cond"        input width of a conditioning signal (context tokens, pooled
                text vector, 256-d timestep frequencies).
  "pos"         rows of the positional table.

Compute happens in `dtype`; layer/RMS norms, softmax (inside
every attention implementation) and adaLN modulation arithmetic run in float32
because they are cheap and the first to lose precision in bfloat16.
"""

from collections.abc import Callable, Sequence
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rflow_jax.model import blocked_attention
from rflow_jax.model import norms
from rflow_jax.model import native_attention

Initializer = Callable[..., jax.Array]

# Both norm types in SD3 use this epsilon (diffusers: eps=1e-6 everywhere).
NORM_EPS = norms.NORM_EPS


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Unmasked softmax attention as two einsums, (B, T, N, D) in and out; the default `attention_impl`.

  The same function as jax.nn.dot_product_attention(implementation="xla"), written for what this model needs: no
  mask or bias, 1/sqrt(D) folded into q (T·D multiplies instead of T·S), and no vmap over head groups, whose
  transpose broadcasts a constant to the full (B, N, T, S) shape in the backward pass. On 2 CPU cores, at the
  shapes config's size (B=32, T=288, 2 heads of 64), an attention forward+backward takes 66 ms instead of 84 ms and
  the whole train step ~4% less (benchmarks/train_step.py). Logits and softmax are float32 whatever the compute
  dtype, as there.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("btnd,bsnd->bnts", q * scale, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnd->btnd", probs, v)


# attention_impl name -> jax.nn.dot_product_attention `implementation`, or a callable (q, k, v) -> out on
# (B, T, N, D) arrays. The callable form is the hook for kernels JAX does not ship behind dot_product_attention,
# e.g. a TPU Pallas flash/splash kernel: `register_attention("splash", fn)` then `--config.model.attention_impl=splash`.
ATTENTION_IMPLS: dict[str, Any] = {
    "einsum": einsum_attention,  # Ours: two einsums and a softmax (the default).
    "blocked": blocked_attention.blocked_attention,  # Ours: cache-sized groups, recomputing backward.
    "native": native_attention.native_attention,  # Ours: C++ CPU kernel via jax.ffi (falls back to "blocked").
    "xla": "xla",
    "cudnn": "cudnn",
    "auto": None,  # Let JAX pick (cuDNN when available, else XLA).
}


def register_attention(name: str, fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> None:
  """Makes `fn(q, k, v) -> out` ((B, T, N, D), unmasked, scale 1/sqrt(D)) selectable as attention_impl=name."""
  if name in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {name!r} is already registered")
  ATTENTION_IMPLS[name] = fn


def xavier_uniform(num_out_axes: int = 1) -> Initializer:
  """Xavier-uniform over a kernel (in, *out): fan_out is the product of outs."""
  return nn.initializers.xavier_uniform(in_axis=0, out_axis=tuple(range(1, 1 + num_out_axes)))


class Dense(nn.Module):
  """Linear layer y = x @ W + b with logical-axis-annotated params.

  Attributes:
    features: output features; a tuple gives a multi-axis output (e.g. (3, H)
      for a fused qkv projection).
    kernel_axes: logical names of the kernel, (in_axis, *feature_axes).
    kernel_init: initializer of the kernel (in, *features).
    bias_init: initializer of the bias (*features,).
    use_bias: whether to add a bias (CLIP's text projection and T5 have none).
    dtype: compute dtype (inputs and kernel are cast to it).
    param_dtype: storage dtype of the params.
  """

  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  kernel_init: Initializer = xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    if len(self.kernel_axes) != 1 + len(features):
      raise ValueError(
          f"kernel_axes {self.kernel_axes} must name the input " f"axis and each of the features {features}"
      )
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (x.shape[-1],) + features,
        self.param_dtype,
    )
    lead = x.shape[:-1]
    # One 2-D matmul over all leading axes: XLA:CPU's weight-gradient of a 3-D dot_general (contracting batch and
    # tokens) ran ~1.5x slower than the same flops as a 2-D (B*T, H) matmul.
    x2 = x.reshape(-1, x.shape[-1]).astype(self.dtype)  # (B*T, in)
    y = x2 @ kernel.reshape(kernel.shape[0], -1).astype(self.dtype)  # (B*T, prod(features))
    y = y.reshape(lead + features)
    if not self.use_bias:
      return y
    bias = self.param(
        "bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[1:]), features, self.param_dtype
    )
    return y + bias.astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """LayerNorm without affine params, computed and returned in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation x * (1 + scale) + shift.

  Args:
    x: (B, T, D) normalised tokens.
    shift: (B, D).
    scale: (B, D).

  Returns:
    (B, T, D) modulated tokens.
  """
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable scale (the SD3 qk-norm).

  Computed in float32; the result is cast back to the input dtype.

  Attributes:
    eps: added to the mean square.
    axis_name: logical name of the scale ("kv" per head in qk-norm, "embed" for T5's residual-stream norm).
    param_dtype: storage dtype of the scale.
  """

  eps: float = NORM_EPS
  axis_name: str = "kv"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def scale(self, features: int) -> jax.Array:
    """The (features,) scale param; for kernels that apply the norm themselves (`joint_attention`'s qk_scales)."""
    return self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
        (features,),
        self.param_dtype,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return norms.rms_norm(x, self.scale(x.shape[-1]), self.eps)


class Mlp(nn.Module):
  """Transformer MLP: Dense(H -> hidden) - GELU(tanh) - Dense(hidden -> H)."""

  hidden_features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = Dense(self.hidden_features, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(
        x
    )  # (B, T, F)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = jax.nn.gelu(h, approximate=True)
    return Dense(width, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)  # (B, T, H)


@jax.custom_vjp
def residual_grad_barrier(streams: Any) -> Any:
  """Identity on a block's residual streams whose gradient XLA:CPU must materialise (other backends: identity).

  Why: in the backward pass the residual stream's gradient at block k is the sum of every later block's
  contributions, each a cheap elementwise term. XLA:CPU fuses such producers into each of their consumers
  (duplicating them), so without a boundary each block's backward fusions recompute the whole chain from the last
  block down: work quadratic in depth (at depth 8, width 512, 256 tokens the first block's fusions took 150
  operands and ~0.5 s of a ~5 s step). `jax.lax.optimization_barrier` does not help, as XLA:CPU removes it
  before fusion. A `lax.cond` on a runtime predicate is a fusion boundary it keeps; the predicate is read from the
  gradient itself, so that XLA cannot fold it, and both branches return the same values.
  """
  return streams


def _residual_grad_barrier_fwd(streams):
  return streams, None


def _residual_grad_barrier_bwd(_, grads):
  if jax.default_backend() != "cpu":
    return (grads,)
  # A conditional's predicate on GPU goes to the host; on TPU fusion does not duplicate this way: CPU only.
  first = jax.tree.leaves(grads)[0]
  finite = jnp.isfinite(first[(0,) * first.ndim])
  add_zero = lambda g: jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), g)  # Distinct branches are not merged.
  return (jax.lax.cond(finite, lambda g: g, add_zero, grads),)


residual_grad_barrier.defvjp(_residual_grad_barrier_fwd, _residual_grad_barrier_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> jax.Array:
  """Unmasked softmax attention on (B, T, N, D) arrays, scale 1/sqrt(D).

  Args:
    q: queries (B, T, N, D).
    k: keys (B, S, N, D).
    v: values (B, S, N, D).
    impl: a key of `ATTENTION_IMPLS`.

  Returns:
    (B, T, N, D) attention output in the dtype of q.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of " f"{sorted(ATTENTION_IMPLS)}")
  impl_or_fn = ATTENTION_IMPLS[impl]
  if callable(impl_or_fn):
    return impl_or_fn(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl_or_fn)


# fn(streams, scales, eps) -> outs: `native_attention.native_packed_attention`'s signature: attention over one or
# two streams' packed (B, T_i, 3, N, D) q/k/v, read in place; with scales (2, 2, D), it applies the q/k RMSNorm too.
PACKED_ATTENTION_IMPLS: dict[str, Callable[..., list[jax.Array]]] = {
    "native": native_attention.native_packed_attention,
}


def joint_attention(
    streams: Sequence[jax.Array], impl: str, qk_scales: Sequence[jax.Array | None] | None = None
) -> list[jax.Array]:
  """Attention over the concatenated tokens of several streams, each given as packed q/k/v.

  Args:
    streams: per stream, (B, T_i, 3, N, D): q, k, v stacked on axis 2 (as `Attention.project_qkv` returns them).
    impl: a key of `ATTENTION_IMPLS`.
    qk_scales: per stream, its q/k RMSNorm scales (2, D) (`Attention.qk_scales`), applied here to the raw q and k
      of `streams`; None where the model has no q/k-norm.

  Returns:
    Per stream, its tokens' rows of the output, (B, T_i, N, D).

  Where `impl` has a packed kernel (at most two streams), the kernel reads each stream's buffer in place, applies
  the q/k-norm while it packs its operands (and the norm's backward pass in its epilogue), and writes each stream's
  output and gradient into buffers of its own: the concatenation, its slices and the normed q and k are never
  materialised. Otherwise the norm runs in JAX and q, k and v are concatenated apart, as `dot_product_attention`
  takes them. Why: XLA:CPU materialised the norm's broadcasts of its scales and row factors as full-size arrays for
  the backward pass, and copied q, k, v into the kernel's layout and the output out of it; at the vs_diffusers size
  (8 joint blocks, 288 tokens, 2 cores) the fused form cut the train step ~5-8% (docs/results/performance.md §1d).
  """
  if qk_scales is not None and all(s is None for s in qk_scales):
    qk_scales = None
  if impl in PACKED_ATTENTION_IMPLS and len(streams) <= 2:
    scales = None
    if qk_scales is not None:
      scales = jnp.stack([qk_scales[0], qk_scales[-1]])  # (2 streams, 2, D); one stream: its scales twice.
    return PACKED_ATTENTION_IMPLS[impl](streams, scales, NORM_EPS)
  if qk_scales is not None:
    streams = [norms.qk_norm(s, sc, NORM_EPS) for s, sc in zip(streams, qk_scales)]
  q, k, v = (jnp.concatenate([s[:, :, i] for s in streams], axis=1) for i in range(3))
  out = dot_product_attention(q, k, v, impl)
  bounds = list(itertools.accumulate(s.shape[1] for s in streams))[:-1]
  return jnp.split(out, bounds, axis=1)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """(..., N*D) -> (..., N, D)."""
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
  """Raises a ValueError naming both values if divisor does not divide value."""
  if divisor <= 0 or value % divisor:
    raise ValueError(f"{name}={value} must be divisible by " f"{divisor_name}={divisor}")


def check_in(name: str, value: object, allowed: Sequence[object]) -> None:
  """Raises a ValueError naming the bad value if it is not allowed."""
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
