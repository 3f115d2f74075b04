#!/usr/bin/env bash
# benchmarks/gpu.py on a lent GPU machine (the `device` tool) in one call; its JSON lines go to $OUT/perf.json.
#
#   here:   make device-wheels                      # once: the wheels that machine lacks, into .whl/
#   device: run(command="bash launch/device_perf.sh [--batch=32 ...]", carry=[".whl"], timeout_s=600)
#
# That machine has Python 3.12 with JAX (CUDA), flax, optax and orbax but not grain, ml_collections or CLU (carried
# in .whl/, installed into /tmp/site as launch/device_shapes.sh does) nor, usually, torch and diffusers: the diffusers
# half of the comparison then reports null with the reason. Arguments go to benchmarks/gpu.py.
set -euo pipefail
OUT="${OUT:?OUT is set by the device tool: where results go}"
PY="${PY:-python3}"
if ! "$PY" -c "import grain, clu, ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/gpu.txt"
"$PY" launch/no_tf.py benchmarks/gpu.py "$@" 2>"$OUT/perf.log" | tee "$OUT/perf.json"
