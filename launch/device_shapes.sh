#!/usr/bin/env bash
# Trains a shapes config on a lent GPU machine (the `device` tool) in one call and leaves the results in $OUT.
#
#   here:   make device-wheels                      # once: the wheels that machine lacks, into .whl/
#   device: run(command="bash launch/device_shapes.sh [--config.x=y ...]", carry=[".whl"], timeout_s=600)
#
# That machine has Python 3.12 with JAX (CUDA), flax, optax and orbax, but not grain, ml_collections, CLU or
# TensorFlow, and it cannot download anything. The carried wheels go into /tmp/site; the trainer runs without
# TensorFlow (no TensorBoard events; metrics.jsonl, PNGs and ShapesEval as usual). Arguments after the script name
# are config overrides.
#
# Environment: CONFIG (default configs/shapes.py:gpu); TRAIN_S, the training time to size the run to (default 300 s:
# unless the overrides set train.num_steps, the step is timed first with benchmarks/train_step.py and num_steps is
# TRAIN_S / step time, with one ShapesEval half-way and one at the end); BUDGET_S, a hard stop (default TRAIN_S + 150
# s: SIGTERM, which checkpoints, then ShapesEval of that checkpoint); PY (python3); WORKDIR (/tmp/shapes_device;
# re-running on a warm machine resumes there). What comes back (8 files, the tool's limit): gpu.txt, bench.json,
# train.log, metrics.jsonl, config.json and eval/{scores.json,failures.json,grid.png} of the newest evaluation.
set -euo pipefail
CONFIG="${CONFIG:-configs/shapes.py:gpu}"
TRAIN_S="${TRAIN_S:-300}"
BUDGET_S="${BUDGET_S:-$(( TRAIN_S + 150 ))}"
OUT="${OUT:?OUT is set by the device tool: where results go}"
WORKDIR="${WORKDIR:-/tmp/shapes_device}"
PY="${PY:-python3}"

if ! "$PY" -c "import grain, clu, ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1 \
  || echo "no nvidia-smi" >"$OUT/gpu.txt"
"$PY" -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"

if [[ " $* " != *" --config.train.num_steps="* ]]; then
  "$PY" benchmarks/train_step.py --config="$CONFIG" --steps=20 "$@" \
    >"$OUT/bench.json" 2>"$OUT/train.log" || { tail -30 "$OUT/train.log"; exit 1; }
  tail -1 "$OUT/bench.json"
  steps=$("$PY" -c "import json, sys; s = json.loads(open(sys.argv[1]).read().splitlines()[-1])['step_s_median']
print(max(200, int(float(sys.argv[2]) / s) // 100 * 100))" "$OUT/bench.json" "$TRAIN_S")
  echo "sized to $steps steps for TRAIN_S=$TRAIN_S" | tee -a "$OUT/gpu.txt"
  set -- "$@" --config.train.num_steps="$steps" --config.train.eval_every=$(( steps / 2 )) \
    --config.train.sample_every=$(( steps / 2 )) --config.train.checkpoint_every=$(( steps / 2 ))
fi

start=$(date +%s)
set +e
# --preserve-status: a run stopped by the budget exits 0 like any preempted run (it checkpointed on SIGTERM).
timeout --preserve-status --signal=TERM --kill-after=120 "$BUDGET_S" \
  "$PY" -m rflow_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" >>"$OUT/train.log" 2>&1
rc=$?
set -e
echo "train rc=$rc wall_s=$(( $(date +%s) - start ))" | tee -a "$OUT/gpu.txt"
grep -E "steps/s|Evaluator|rror" "$OUT/train.log" | tail -20 || true

# A run stopped by the budget skipped its final ShapesEval: score its last checkpoint now (into eval_step<N>/).
if [[ $rc == 0 ]] && grep -q "SIGTERM: checkpoint of step" "$OUT/train.log"; then
  "$PY" -m rflow_jax.eval.run_shapes --workdir="$WORKDIR" 2>&1 | tail -3
fi
cp "$WORKDIR/metrics.jsonl" "$WORKDIR/config.json" "$OUT/" 2>/dev/null || true
last_eval=$(ls -dt "$WORKDIR"/eval "$WORKDIR"/eval_step* 2>/dev/null | head -1 || true)  # Newest first.
if [[ -n "$last_eval" ]]; then
  mkdir -p "$OUT/eval"
  cp "$last_eval"/scores.json "$last_eval"/failures.json "$last_eval"/grid.png "$OUT/eval/" 2>/dev/null || true
  echo "eval from $last_eval:"; cat "$OUT/eval/scores.json"
fi
exit "$rc"
