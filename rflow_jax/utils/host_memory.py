"""Keep freed host memory for reuse, so that XLA:CPU's per-execution buffers stop costing page faults every step.

Why: XLA:CPU allocates each execution's temporary buffer (about 1 GB for a 73M-parameter MM-DiT step at batch 8) with
the C library's `malloc` from its own worker threads, and frees it when the execution ends. glibc serves such a block
from a fresh `mmap` (worker threads use non-main arenas, whose heaps hold at most 64 MB, and blocks over 32 MB are
mmapped anyway) and returns it with `munmap`. So every step the kernel maps and zeroes a gigabyte again, one 4 KiB
page fault at a time: ~260,000 faults and ~0.5 CPU s of kernel time per step at that size, paid inside whichever XLA
kernel first writes each page (docs/results/performance.md §1e has the measurements).

`configure("reuse")` sets three glibc `mallopt` parameters: one arena for every thread (M_ARENA_MAX=1), no `mmap` for
large blocks (M_MMAP_MAX=0) and no trimming of the heap's top (M_TRIM_THRESHOLD=-1). Then a freed block stays in the
heap and the next execution gets the same pages back, already mapped: the vs_diffusers-size step ran 10-11% faster,
the shapes trainer's steps/s rose ~25%. The cost is host memory: freed memory is never returned to the system by
itself, and the one heap fragments when steps are dispatched ahead of their execution (the queued steps' buffers land
between the executing step's temporaries). So under "reuse" the trainer waits for each step before dispatching the
next (on the CPU the host prepares batches on the same cores anyway), and calls `release_free()` after compiling and
after each preview or evaluation: the shapes trainer then peaked at 1.6 GB against 2.0 GB with glibc's defaults (5.3
GB with two steps queued). The other entry points gain too: sampling 64 images and a ShapesEval ran ~35% faster at a
lower peak, precompute ran the same (identical output bytes each time; docs/results/performance.md §1e).

Modes ($RFLOW_JAX_MALLOC): `auto` (the default) is `reuse` where JAX can only run on the CPU and `system` where it
may run on a GPU or TPU (JAX_PLATFORMS names one, or a GPU/TPU runtime is installed): there activations live in device
memory, and reuse would only keep the host's freed memory from the data pipeline. `system` keeps glibc's behaviour;
`reuse` forces it.

It has to run before JAX starts its thread pools (the first computation or `jax.devices()`): a thread that has
allocated keeps its arena (set later, the same step still took ~70,000 faults in 16 arenas). And after the imports:
something the heavy imports (jax, TensorFlow, protobuf) load resets glibc's parameters (set before them, ~16,000
faults per step were left; after them, none). Every command-line entry point calls it from `cli.parse_flags`, the
first code `app.run` runs after the imports. Where `mallopt` does not exist (macOS, musl), nothing changes.
"""

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil

ENV = "RFLOW_JAX_MALLOC"
MODES = ("auto", "system", "reuse")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIM = -1  # glibc reads it as SIZE_MAX: never trim.

_reusing = False  # Whether configure() set "reuse" in this process.


@functools.cache
def _libc() -> tuple[str | None, ctypes.CDLL | None]:
  """The C library's name and handle (None where it cannot be found); find_library may run ldconfig: once."""
  name = ctypes.util.find_library("c")
  return name, (ctypes.CDLL(name) if name else None)


def accelerator() -> str | None:
  """Why JAX may run on an accelerator in this process, or None where it can only use the CPU.

  Read without starting JAX (configure must run before its threads do): JAX_PLATFORMS where it is set; else whether
  a GPU or TPU runtime is installed, i.e. a JAX plugin (a `jax_plugins` module or entry point: the CUDA and ROCm
  plugins) or the `libtpu` package.
  """
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return None if set(platforms) == {"cpu"} else f"JAX_PLATFORMS={','.join(platforms)}"
  if importlib.util.find_spec("libtpu") is not None:
    return "libtpu is installed"
  plugins = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  # A namespace package: its modules are the plugins.

    plugins += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  return f"JAX plugin {plugins[0]} is installed" if plugins else None


def configure(mode: str | None = None) -> str:
  """Applies `mode` (default: $RFLOW_JAX_MALLOC, else "auto"); returns what the process now does.

  Returns "reuse" or "system", "system (auto: <why an accelerator may be used>)", or "system (no mallopt: ...)"
  where the C library has none. Calling it again is harmless, and needed if something reset the parameters since:
  some imports do.
  """
  mode = mode if mode is not None else os.environ.get(ENV, "auto")
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
  if mode == "auto":
    reason = accelerator()
    if reason is not None:
      return f"system (auto: {reason})"
    mode = "reuse"
  if mode == "system":
    return "system"
  name, libc = _libc()
  mallopt = getattr(libc, "mallopt", None)
  if mallopt is None:
    return f"system (no mallopt: C library {name})"
  # Arena first: a thread that allocates after this joins the main arena, whose heap (brk) can hold any size.
  done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)]
  global _reusing
  _reusing = all(done)
  return "reuse" if _reusing else f"system (mallopt refused: {done})"


def reusing() -> bool:
  """Whether configure() set "reuse" in this process."""
  return _reusing


def release_free() -> bool:
  """Under "reuse", gives the heap's free pages back to the system (glibc's malloc_trim(0)); returns whether it did.

  For after a compile: the compiler's freed memory would otherwise stay resident beside the step's buffers for the
  whole run. The pages come back (one fault each) only where a later allocation lands on them. Without "reuse",
  glibc returns large blocks by itself and this does nothing.
  """
  if not _reusing:
    return False
  _libc()[1].malloc_trim(0)  # Set only where configure() found mallopt, i.e. glibc, which has malloc_trim too.
  return True
