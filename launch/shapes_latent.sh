#!/usr/bin/env bash
# Shapes in latent space, end to end on the CPU (configs/shapes_latent.py says what and why):
#
#   bash launch/shapes_latent.sh [--config.x=y ...]      # overrides go to the training step
#
#   0. the shapes VAE, unless $VAE exists: trained (configs/shapes_vae.py, ~38 min here) and exported with its
#      latent shift/scale (python -m rflow_jax.export.latent_stats)
#   1. $N shapes scenes rendered to an image folder at 64×64 (PNG + metadata.jsonl)
#   2. converted to ArrayRecord (python -m rflow_jax.data.convert)
#   3. precomputed: VAE posterior moments and the SD3-architecture tiny text encoders' outputs
#   4. the MM-DiT trained on the latents into $WORKDIR (re-running resumes it)
#   5. ShapesEval of fresh prompts, sampled latents decoded through the VAE (WORKDIR/eval_step<N>/scores.json)
#
# Steps 0-3 are skipped when their output exists (convert and precompute also resume a killed run). Each step's
# wall time goes to $DATA/times.txt. Environment: PY (python; .venv/bin/python when there is one), VAE
# (runs/shapes_vae_export), DATA (data/shapes_latent), WORKDIR (runs/shapes_latent), N (10000 images).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
VAE="${VAE:-runs/shapes_vae_export}"
DATA="${DATA:-data/shapes_latent}"
WORKDIR="${WORKDIR:-runs/shapes_latent}"
N="${N:-10000}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$DATA"

timed() {  # timed NAME COMMAND...: runs it and appends "NAME SECONDS load=LOAD" to $DATA/times.txt.
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*" >&2
  "$@"
  echo "$name $(( SECONDS - start ))s load=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$DATA/times.txt"
}

if [[ ! -f "$VAE/config.json" ]]; then
  vae_run="${VAE%_export}"
  [[ "$vae_run" == "$VAE" ]] && vae_run="$VAE.run"
  timed vae_train "$PY" -m rflow_jax.main --config=configs/shapes_vae.py --workdir="$vae_run"
  timed vae_export "$PY" -m rflow_jax.export.latent_stats --vae="$vae_run" --out="$VAE" --num_examples=256 \
    --batch_size=64
fi
[[ -d "$DATA/images" ]] || timed render "$PY" -m launch.shapes_folder --out="$DATA/images" --num_records="$N"
[[ -f "$DATA/converted/manifest.json" ]] || timed convert "$PY" -m rflow_jax.data.convert --format=imagefolder \
  --input="$DATA/images" --out="$DATA/converted" --workers=2
[[ -f "$DATA/latents/manifest.json" ]] || timed precompute "$PY" -m rflow_jax.precompute \
  --config=configs/shapes_latent.py:precompute --out="$DATA/latents" --config.data.path="$DATA/converted" \
  --config.vae.path="$VAE"
timed train "$PY" -m rflow_jax.main --config=configs/shapes_latent.py --workdir="$WORKDIR" \
  --config.data.path="$DATA/latents" "$@"
timed shapes_eval "$PY" -m rflow_jax.eval.run_shapes --workdir="$WORKDIR"
