"""Keep freed host memory for reuse, so that XLA:CPU's per-execution buffers stop costing page faults every step.

Why: XLA:CPU allocates each execution's temporary buffer (about 1 GB for a 73M-parameter MM-DiT step at batch 8) with
the C library's `malloc` from its own worker threads, and frees it when the execution ends. glibc serves such a block
from a fresh `mmap` (worker threads use non-main arenas, whose heaps hold at most 64 MB, and blocks over 32 MB are
mmapped anyway) and returns it with `munmap`. So every step the kernel maps and zeroes a gigabyte again, one 4 KiB
page fault at a time: ~260,000 faults and ~0.5 CPU s of kernel time per step at that size, paid inside whichever
XLA kernel first writes each page (docs/results/performance.md §1e has the measurements).

`configure()` sets three glibc `mallopt` parameters: one arena for every thread (M_ARENA_MAX=1), no `mmap` for large
blocks (M_MMAP_MAX=0) and no trimming of the heap's top (M_TRIM_THRESHOLD=-1). Then a freed block stays
in the heap and the next execution gets the same pages back, already mapped. The cost: the process's resident memory
stays at its peak instead of shrinking between steps, and all threads share one malloc lock (on the CPU, XLA's
threads allocate a few buffers per execution, not per element).

It has to run before JAX starts its thread pools (the first computation or `jax.devices()`): a thread that has
allocated keeps its arena. And after the imports: something in the jax/protobuf import chain resets glibc's
parameters (calling it before them left ~16,000 faults per step, after them none). Every command-line entry point
calls it from `cli.parse_flags`, the first code `app.run` runs after the imports. Set `RFLOW_JAX_MALLOC` to choose:

  auto    (default) reuse when JAX will run on the CPU (JAX_PLATFORMS names cpu first, or no GPU/TPU plugin is
          installed); on accelerators, where host memory does not hold the activations, change nothing
  reuse   always
  system  never: glibc's defaults

Where `mallopt` does not exist (macOS, musl), nothing changes.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

ENV = "RFLOW_JAX_MALLOC"
MODES = ("auto", "reuse", "system")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIM = -1  # glibc reads it as SIZE_MAX: never trim.


def _accelerator_plugins() -> list[str]:
  """The GPU/TPU backends JAX would find, by the same discovery JAX uses (no backend is started)."""
  found = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  # The namespace package of JAX's PJRT plugins.

    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return found


def runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS (or jax_platforms) names it first, or no accelerator exists."""
  import jax  # pylint: disable=g-import-not-at-top

  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_plugins()


def configure(mode: str | None = None) -> str:
  """Applies `mode` (default: $RFLOW_JAX_MALLOC, else "auto"); returns what the process now does.

  Returns "reuse" or "system", or "system (no mallopt: ...)" where the C library has none. Calling it again is
  harmless, and needed if something reset the parameters since: some imports do (the jax/protobuf chain did here).
  """
  mode = mode if mode is not None else os.environ.get(ENV, "auto")
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
  if mode == "system" or (mode == "auto" and not runs_on_cpu()):
    return "system"
  name = ctypes.util.find_library("c")
  mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
  if mallopt is None:
    return f"system (no mallopt: C library {name})"
  # Arena first: a thread that allocates after this joins the main arena, whose heap (brk) can hold any size.
  done = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)]
  return "reuse" if all(done) else f"system (mallopt refused: {done})"
