"""Suite-wide setup: one JAX persistent compilation cache shared by every test, worker and subprocess.

Most of the suite's time is compiling the same few programs (the debug config's train step, sampler, validation
loss) again in each test's fresh Setup and in each subprocess a test starts: the CLI tests, the kill-and-resume
tests (one process per restart), the multi-process runs. With JAX's persistent cache the first compile of a program
is written to disk and every later one loads it, as a user's restarted run does with JAX_COMPILATION_CACHE_DIR set
(README). Cached executables are the compiled programs themselves, so every bitwise comparison is unaffected.

Set here, before any test module imports jax (jax reads these variables at import), in the pytest process that
starts the xdist workers; workers and subprocesses inherit them. A cache directory given by the caller is kept.
A test that must compile for real (a signal sent during compilation) removes the variable from its subprocess's
environment: `cli_util.without_compile_cache`.
"""

import os
import tempfile

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"

if CACHE_VARIABLE not in os.environ:
  os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="rflow_jax_test_compile_cache_")
# Cache every program, however small or quick to compile (the defaults skip those under 1 s of compilation).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

