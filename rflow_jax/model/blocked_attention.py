"""Blocked softmax attention with a recomputing backward pass (flash-attention's algorithm, pure JAX).

`blocked_attention(q, k, v)` computes the same function as `layers.einsum_attention` ((B, T, N, D) in and out,
unmasked, scale 1/sqrt(D), float32 logits and softmax), but

  * the (batch x head) pairs are processed in groups by `lax.map`, so one group's (G, T, S) logits stay in the CPU
    caches instead of streaming a (B, N, T, S) array through memory several times;
  * the softmax is normalised on the (T, D) output instead of the (T, S) probabilities;
  * the backward pass (a custom_vjp) keeps only q, k, v, the output and the row log-sum-exp, recomputes the
    probabilities from them, and uses rowsum(dO * O) instead of rowsum(P * dP) (Dao et al. 2022, arXiv 2205.14135,
    Algorithm 4): no (B, N, T, S) tensor is saved between the passes.

Registered as attention_impl="blocked" (rflow_jax.model.layers).
"""

import jax
import jax.numpy as jnp

# Most bytes of one group's float32 (G, T, S) logits: about a core's L2 on current x86 CPUs, so the elementwise
# passes over them hit cache. At B=8, 8 heads, 288 tokens (331 KiB per pair) that is one pair per group; measured
# there, groups of 8 pairs (2.6 MiB) were ~2x slower than groups of 1 or 2.
GROUP_BYTES = 1 << 19


def _group_size(pairs: int, t: int, s: int) -> int:
  """The largest divisor of `pairs` (= B * N) whose (G, T, S) float32 logits fit GROUP_BYTES (at least 1)."""
  best = 1
  for g in range(1, pairs + 1):
    if pairs % g == 0 and g * t * s * 4 <= GROUP_BYTES:
      best = g
  return best


def _logits(q, k):
  return jnp.einsum("gtd,gsd->gts", q, k, preferred_element_type=jnp.float32)


def _fwd_group(q, k, v):
  """One group: q (G, T, D) already scaled, k, v (G, S, D) -> out (G, T, D), lse (G, T) float32."""
  s = _logits(q, k)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("gts,gsd->gtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
  return o.astype(v.dtype), (m + jnp.log(l))[..., 0]


def _bwd_group(q, k, v, o, lse, do):
  """Gradients of one group w.r.t. the scaled q, k and v."""
  p = jnp.exp(_logits(q, k) - lse[..., None])  # (G, T, S) float32, recomputed.
  dv = jnp.einsum("gts,gtd->gsd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dp = jnp.einsum("gtd,gsd->gts", do, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # = rowsum(P * dP)
  ds = p * (dp - delta)
  dq = jnp.einsum("gts,gsd->gtd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("gts,gtd->gsd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _to_groups(x, g):
  """(B, T, N, D) -> (B*N/g, g, T, D), heads-major."""
  b, t, n, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * n // g, g, t, d)


def _from_groups(x, b, n):
  """Inverse of _to_groups."""
  _, _, t, d = x.shape
  return x.reshape(b, n, t, d).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _attention(q, k, v):
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  b, t, n, _ = q.shape
  g = _group_size(b * n, t, k.shape[1])
  qg, kg, vg = (_to_groups(a, g) for a in (q, k, v))
  o, lse = jax.lax.map(lambda a: _fwd_group(*a), (qg, kg, vg))
  return _from_groups(o, b, n), (qg, kg, vg, o, lse)


def _attention_bwd(res, dout):
  qg, kg, vg, o, lse = res
  b, _, n, _ = dout.shape
  dog = _to_groups(dout, qg.shape[1])
  grads = jax.lax.map(lambda a: _bwd_group(*a), (qg, kg, vg, o, lse, dog))
  return tuple(_from_groups(gr, b, n) for gr in grads)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Unmasked softmax attention, (B, T, N, D) in and out, scale 1/sqrt(D), computed in cache-sized groups.

  Args:
    q: queries (B, T, N, D).
    k: keys (B, S, N, D).
    v: values (B, S, N, D).

  Returns:
    (B, T, N, D) in the dtype of v; logits and softmax in float32.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  return _attention(q * scale, k, v)
