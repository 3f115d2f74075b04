"""The RMSNorm formula, shared by `layers.RMSNorm` and the native attention kernel's fallback (one home for it).

The native kernel (native/attention_cpu.cc: Rinv, NormRows, NormBackRows) computes the same function in C++ for the
q/k-norm it fuses into attention; tests/native_attention_test.py pins the two together.
"""

import jax
import jax.numpy as jnp

NORM_EPS = 1e-6  # LayerNorm and RMSNorm epsilon of SD3's MM-DiT (and T5's norms).


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / sqrt(mean(x^2 over the last axis) + eps) * scale, in float32; returned in x's dtype."""
  y = x.astype(jnp.float32)
  y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def qk_norm(qkv: jax.Array, scales: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """RMSNorm of q and k in packed (B, T, 3, N, D) q/k/v, with scales (2, D) (q's, k's); v is passed through."""
  return jnp.stack(
      [rms_norm(qkv[:, :, 0], scales[0], eps), rms_norm(qkv[:, :, 1], scales[1], eps), qkv[:, :, 2]], axis=2
  )
