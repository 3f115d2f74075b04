#!/usr/bin/env bash
# Trains rflow_jax on a Cloud TPU VM slice: creates the slice (unless it exists), copies this checkout to every
# worker, installs it, and runs the same command on all workers. jax.distributed finds its peers by itself on TPU
# VMs (--distributed=auto); process i of N reads the i-th block of every global batch.
#
#   TPU_NAME=rf-d24 ZONE=us-east5-a ACCELERATOR=v5p-128 \
#     launch/tpu_pod.sh --config=configs/sd3.py:d24 --workdir=/mnt/shared/runs/d24 --config.train.peak_tflops_per_device=459
#
# Everything after the script name is passed to `python -m rflow_jax.main`. The workdir must be a filesystem every
# worker sees at the same path (Filestore/NFS or a GCS FUSE mount): Orbax writes one checkpoint from all hosts, and
# the trainer writes its config and events with plain file I/O (gs:// workdirs are not supported yet).
# Multi-slice (v5p/v6e over DCN): create the slices as a queued resource with --node-count and set
# --config.sharding.dcn_mesh_shape, e.g. "(2,1,1)" for data parallelism across 2 slices (docs/scaling.md).
#
# Not runnable where rflow_jax is developed (no gcloud, no TPUs): kept in step with main.py's flags by review.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5p-64}"                  # Slice type (v5p-N / v6e-N / v5litepod-N).
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"   # TPU VM image (v6e: v2-alpha-tpuv6e).
PROJECT="${PROJECT:-$(gcloud config get-value project)}"
REMOTE_DIR="${REMOTE_DIR:-rflow_jax}"                  # Checkout location on each worker (home directory).
CREATE="${CREATE:-1}"                                  # 0: use an existing slice.

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }

if [[ "$CREATE" == 1 ]] && ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION"
fi

# Same code on every worker: copy this checkout (without local venvs and runs), then install it with TPU jax.
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$REPO_ROOT" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/rflow_jax_src.tgz .
tpu scp /tmp/rflow_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all
tpu ssh "$TPU_NAME" --worker=all --command="
  set -e; mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/rflow_jax_src.tgz && cd $REMOTE_DIR &&
  python3 -m pip install -q -c constraints.txt -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# One process per worker, all started together; logs stay on each worker in ~/rflow_jax_train.log.
ARGS=$(printf ' %q' "$@")
tpu ssh "$TPU_NAME" --worker=all --command="
  cd $REMOTE_DIR && nohup python3 -m rflow_jax.main --distributed=auto $ARGS > ~/rflow_jax_train.log 2>&1 &"
echo "Started on all workers of $TPU_NAME. Follow: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/rflow_jax_train.log'"
