"""pytest root: makes `configs` importable and keeps JAX on a quiet, deterministic CPU setup for tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs (the debug train step, compiled by several tests and CLI subprocesses) compile once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"rflow_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tests check behaviour, and numerics at stated tolerances, not what XLA's optimisation passes make of a program:
# compiling without them takes ~1/4 less of the suite's time (compiles are most of it on CPU), and every process a
# test starts inherits the setting, so in-process and subprocess results come from the same kind of program. Tests
# that read XLA's memory analysis of a pod preset ask for the optimising compiler themselves.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's LLVM IR fusion emitters generate a program's kernels in about half the CPU time of its newer MLIR fusion
# emitters (configs/debug.py's train step: ~13 -> ~6.5 CPU s), and code generation is most of a compile here.
# Only together with JAX_DISABLE_MOST_OPTIMIZATIONS=1: with XLA's optimisation passes on, the same flag makes compiles
# far slower (that step's optimiser update alone: 9.8 -> 127 CPU s), so a test that asks for the optimising compiler
# sets its own XLA_FLAGS.
# Code generation in one piece rather than split over threads: ~8% less CPU for that compile (6.1-6.5 vs 6.7-7.4 s,
# alternating), and in the suite both cores are busy with xdist workers anyway.
# Subprocesses with fake devices add their device count to these flags (tests/cli_util.py::xla_flags).
_SUITE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SUITE_XLA_FLAGS}".strip()


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Runs the modules that hold slow tests first, each module's tests together and in their order.

  pytest-xdist hands tests to its workers in this order; a long test handed out last would keep one worker busy
  while the other idles. Whole modules move, so a module-scoped fixture is still set up once per worker.
  """
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
