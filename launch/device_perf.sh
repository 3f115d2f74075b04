#!/usr/bin/env bash
# benchmarks/gpu.py on a lent GPU machine (the `device` tool) in one call; its JSON lines go to $OUT/perf.json.
#
#   here:   make device-wheels                      # once: the wheels that machine lacks, into .whl/
#   device: run(command="CALL_S=570 bash launch/device_perf.sh [--batch=32 ...]", carry=[".whl"], timeout_s=590)
#
# That machine has Python 3.12 with JAX (CUDA), torch (CUDA), flax, optax and orbax, but not grain, ml_collections,
# CLU, TensorFlow or diffusers, and it cannot download anything. The carried wheels (those, and flax, optax, orbax
# and chex at this project's pins) go into /tmp/site, ahead of the machine's own packages. Arguments go to
# benchmarks/gpu.py; its default --budget_s=480 keeps the whole call under 8 minutes after the machine's start.
# CALL_S (default 0: off): the call's length; when the first pass leaves more than 2 minutes of it, a second pass of
# the two step timings that matter (rflow_jax, diffusers_compile) runs in what is left, from warm compile caches, so
# that one call gives each number twice. What comes back: gpu.txt (the card and the versions), perf.json (the JSON
# lines), perf.log (stderr of every part), dump/{hlo.txt.gz,trace.json.gz} (rflow_jax's optimised HLO and a profiler
# trace of two steps, to study without the GPU).
set -euo pipefail
OUT="${OUT:?OUT is set by the device tool: where results go}"
PY="${PY:-python3}"
start=$(date +%s)
WHEELS="${WHEELS:-.whl}"  # Where the carried wheels are; none there: the machine's packages as they are.
site=""
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  site=/tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
fi
export PYTHONPATH="${site:+$site:}$PWD" PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >"$OUT/gpu.txt" 2>&1 \
  || echo "no nvidia-smi" >"$OUT/gpu.txt"
"$PY" -c "import sys, jax, flax, optax, torch, diffusers; print(sys.version.split()[0], 'jax', jax.__version__,
  jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__,
  'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt" || true  # A missing one: gpu.py reports it.
"$PY" benchmarks/gpu.py --dump_dir="$OUT/dump" "$@" 2>"$OUT/perf.log" | tee "$OUT/perf.json"
left=$(( ${CALL_S:-0} - ($(date +%s) - start) - 30 ))
if (( left > 120 )); then
  echo "second pass: rflow_jax, diffusers_compile in ${left} s" | tee -a "$OUT/gpu.txt"
  "$PY" benchmarks/gpu.py "$@" --parts=rflow_jax,diffusers_compile --budget_s="$left" 2>>"$OUT/perf.log" \
    | tee -a "$OUT/perf.json"
fi
