"""Native CPU attention: a C++ kernel (native/attention_cpu.cc) called through `jax.ffi`, with a custom_vjp.

`native_attention(q, k, v)` computes the same function as `layers.einsum_attention` ((B, T, N, D) in and out,
unmasked, scale 1/sqrt(D)) in float32 on CPU, with flash attention's recomputing backward pass (Dao et al. 2022,
arXiv 2205.14135): the forward saves only the output and the row log-sum-exp; the backward recomputes the
probabilities. The kernel parallelises over (batch, head) pairs on XLA's intra-op thread pool and multiplies with
AVX2/FMA register-blocked micro-kernels (plain loops where the compiler has no AVX2).

Registered as attention_impl="native" (rflow_jax.model.layers). `native_packed_attention` is the form the joint
block calls (`layers.joint_attention`): q, k, v read in place from each stream's packed (B, T, 3, N, D) buffer,
with the q/k RMSNorm of both streams fused into the kernel's operand packing (and its gradient into the backward's
epilogue). This module also builds and loads the library for its other user, the fused optimiser update (rflow_jax/train/native_update.py). The library is built at install time
(`make install`, or `python -m rflow_jax.model.native_attention`) with `-march=native`, i.e. for the machine that
builds it; importing this module builds and loads nothing: the library is loaded at the first trace. Wherever the
kernel cannot run, the call falls back to `blocked_attention.blocked_attention` (the same math in pure JAX) and logs
one warning naming why: the library is absent or does not load, an input is not float32, or the default backend is
not CPU.

Sharding: the FFI call has no partitioning rule, so under a jit whose inputs are sharded across devices XLA gathers
q, k and v and runs the kernel replicated on every device (correct, but no faster than one device). It is meant for
single-host CPU training and evaluation.
"""

from collections.abc import Sequence
import ctypes
import functools
import os
import subprocess
import sys
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.model import blocked_attention
from rflow_jax.model import norms

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
# The library's translation units: this kernel, and the fused optimiser update (rflow_jax/train/native_update.py).
UNITS = (os.path.join(_DIR, "attention_cpu.cc"), os.path.join(_DIR, "adamw_cpu.cc"))
SOURCES = UNITS + tuple(os.path.join(_DIR, h) for h in ("kernels.h", "parallel.h"))  # What the library is built from.
# Where `build()` writes by default and `load()` reads; tests point it elsewhere.
LIBRARY_PATH = os.path.join(_DIR, "native_cpu.so")
CXX = os.environ.get("CXX", "g++")
# -march=native: the AVX2/FMA micro-kernels need it and the library is built on the machine that runs it.
# -fno-math-errno lets std::exp/log inline; no -ffast-math, so NaN and infinity keep their IEEE behaviour.
CXXFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
TARGETS = {
    "fwd": "rflow_native_attention_fwd",
    "bwd": "rflow_native_attention_bwd",
    "packed_fwd": "rflow_native_attention_packed_fwd",
    "packed_bwd": "rflow_native_attention_packed_bwd",
    "adamw": "rflow_native_adamw_ema",
}
_SYMBOLS = {
    "fwd": "RflowAttentionFwd",
    "bwd": "RflowAttentionBwd",
    "packed_fwd": "RflowAttentionPackedFwd",
    "packed_bwd": "RflowAttentionPackedBwd",
    "adamw": "RflowAdamwEma",
}

_load_errors: dict[str, str | None] = {}  # Library path -> None (loaded) or why it could not be.
_registered = False  # The FFI targets are registered once per process, by the first library that loads.
_warned: set[str] = set()


def build(out_path: str = LIBRARY_PATH) -> str:
  """Compiles the library's UNITS into the shared library `out_path` (written atomically); returns the path.

  Raises:
    RuntimeError: one line naming the compiler, its flags and its first error line.
  """
  cmd = [CXX, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), *UNITS]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(os.path.abspath(out_path)))
  os.close(fd)
  try:
    try:
      proc = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True, check=False)
    except OSError as e:
      raise RuntimeError(f"native attention: cannot run {CXX} {' '.join(CXXFLAGS)}: {e}") from None
    if proc.returncode:
      first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
      raise RuntimeError(f"native attention: {CXX} {' '.join(CXXFLAGS)} failed ({proc.returncode}): {first}")
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_path


def load(path: str | None = None) -> str | None:
  """Loads the library at `path` (default LIBRARY_PATH) and registers its FFI targets; None or why it failed."""
  global _registered
  path = path or LIBRARY_PATH
  if path in _load_errors:
    return _load_errors[path]
  error = None
  if not os.path.exists(path):
    error = f"{path} does not exist (build it with `make install` or `python -m rflow_jax.model.native_attention`)"
  else:
    try:
      lib = ctypes.cdll.LoadLibrary(path)
      capsules = {key: jax.ffi.pycapsule(getattr(lib, sym)) for key, sym in _SYMBOLS.items()}
      if not _registered:
        for key, capsule in capsules.items():
          jax.ffi.register_ffi_target(TARGETS[key], capsule, platform="cpu")
        _registered = True
    except (OSError, AttributeError) as e:
      error = f"{path} does not load: {e}"
  _load_errors[path] = error
  return error


def called_by(hlo_text: str) -> bool:
  """Whether a compiled program (its `as_text()`) calls the kernel; False where every call fell back."""
  return TARGETS["fwd"] in hlo_text or TARGETS["packed_fwd"] in hlo_text


def _fallback_reason(*arrays) -> str | None:
  if jax.default_backend() != "cpu":
    return f"the default backend is {jax.default_backend()}, not cpu"
  dtypes = {jnp.dtype(a.dtype) for a in arrays}
  if dtypes != {jnp.dtype(jnp.float32)}:
    return f"inputs are {sorted(str(d) for d in dtypes)}, not float32"
  return load()


def _forward(q, k, v):
  b, t, n, _ = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return jax.ffi.ffi_call(TARGETS["fwd"], out_types, vmap_method="sequential")(q, k, v)


@jax.custom_vjp
def _attention(q, k, v):
  return _forward(q, k, v)[0]


def _attention_fwd(q, k, v):
  out, lse = _forward(q, k, v)
  return out, (q, k, v, out, lse)


def _attention_bwd(res, dout):
  q, k, v, _, _ = res
  out_types = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
  return tuple(jax.ffi.ffi_call(TARGETS["bwd"], out_types, vmap_method="sequential")(*res, dout))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _packed_forward(x0, x1, scales, norm, eps):
  b, _, _, n, d = x0.shape
  out_types = tuple(jax.ShapeDtypeStruct((b, x.shape[1], n, d), jnp.float32) for x in (x0, x1))
  out_types += (jax.ShapeDtypeStruct((b, n, x0.shape[1] + x1.shape[1]), jnp.float32),)
  call = jax.ffi.ffi_call(TARGETS["packed_fwd"], out_types, vmap_method="sequential")
  return call(x0, x1, scales, norm=norm, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _packed_attention(x0, x1, scales, norm, eps):
  return _packed_forward(x0, x1, scales, norm, eps)[:2]


def _packed_attention_fwd(x0, x1, scales, norm, eps):
  out0, out1, lse = _packed_forward(x0, x1, scales, norm, eps)
  return (out0, out1), (x0, x1, scales, out0, out1, lse)


def _packed_attention_bwd(norm, eps, res, douts):
  x0, x1, scales = res[:3]
  b, _, _, n, d = x0.shape
  out_types = (jax.ShapeDtypeStruct(x0.shape, jnp.float32), jax.ShapeDtypeStruct(x1.shape, jnp.float32))
  out_types += (jax.ShapeDtypeStruct((b * n,) + scales.shape, jnp.float32),)
  call = jax.ffi.ffi_call(TARGETS["packed_bwd"], out_types, vmap_method="sequential")
  dx0, dx1, dscales = call(*res, *douts, norm=norm, eps=np.float32(eps))
  return dx0, dx1, dscales.sum(axis=0)  # The (batch, head) items' shares.


_packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)


def _warn_fallback(reason: str) -> None:
  if reason not in _warned:
    _warned.add(reason)
    logging.warning("attention_impl=native falls back to blocked attention: %s", reason)


def native_packed_attention(
    streams: Sequence[jax.Array], scales: jax.Array | None = None, eps: float = norms.NORM_EPS
) -> list[jax.Array]:
  """Self-attention over the concatenated tokens of one or two streams' packed q/k/v, with an optional q/k RMSNorm.

  Args:
    streams: per stream, (B, T_i, 3, N, D): q, k, v stacked on axis 2 (T_0 > 0).
    scales: None, or (2, 2, D): per stream, the (q, k) RMSNorm scales (`norms.qk_norm`), applied to the streams'
      q and k first (with one stream, scales[1] is unused).
    eps: the RMSNorm epsilon.

  Returns:
    Per stream, its rows of `native_attention` of the concatenated (normed) q, k, v: (B, T_i, N, D) float32. The
    kernel reads each stream's rows in place, norms q and k while it packs its operands, and in the backward pass
    applies the norm's gradient to dQ and dK before writing them into each stream's (B, T_i, 3, N, D) gradient; so
    neither the concatenation, nor its slices, nor the normed q and k are ever materialised.
  """
  if not 1 <= len(streams) <= 2:
    raise ValueError(f"native_packed_attention takes 1 or 2 streams, not {len(streams)}")
  reason = _fallback_reason(*streams, *([] if scales is None else [scales]))
  if reason is not None:
    _warn_fallback(reason)
    if scales is not None:
      streams = [norms.qk_norm(x, sc, eps) for x, sc in zip(streams, scales)]
    qkv = jnp.concatenate(streams, axis=1)
    out = blocked_attention.blocked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return jnp.split(out, [streams[0].shape[1]], axis=1)[: len(streams)]
  x0 = streams[0]
  x1 = streams[1] if len(streams) == 2 else jnp.zeros((x0.shape[0], 0) + x0.shape[2:], x0.dtype)
  norm = scales is not None
  if not norm:
    scales = jnp.zeros((2, 2, x0.shape[-1]), jnp.float32)  # Not read; the call's signature has it.
  return list(_packed_attention(x0, x1, scales, norm, eps))[: len(streams)]


def native_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Unmasked softmax attention, (B, T, N, D) in and out, scale 1/sqrt(D), by the native CPU kernel.

  Args:
    q: queries (B, T, N, D).
    k: keys (B, S, N, D).
    v: values (B, S, N, D).

  Returns:
    (B, T, N, D) float32; `blocked_attention.blocked_attention(q, k, v)` where the kernel cannot run.
  """
  reason = _fallback_reason(q, k, v)
  if reason is not None:
    _warn_fallback(reason)
    return blocked_attention.blocked_attention(q, k, v)
  return _attention(q, k, v)


def main() -> int:
  """Builds the library at LIBRARY_PATH; on failure prints one line and returns 1 (the runtime falls back)."""
  try:
    print(f"built {build()}")
  except RuntimeError as e:
    print(
        f"{e}; attention_impl=native and optim.update_impl=native will fall back (blocked attention, optax)",
        file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
