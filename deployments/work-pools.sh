#!/usr/bin/env bash
# Work pools for fcdpo's deployments (deployments/prefect.yaml), on the server in $PREFECT_API_URL.
#
#   local  process pool: the pipeline and the scheduled rerun-on-new-problem-sets flow (light: they
#          orchestrate, load problems, label, build pairs; with the local executor they also sample)
#   gpu    one worker per GPU host: sample-shard (the deployment executor's shards), train, evaluate.
#          Process type by default (a worker started on the GPU host itself); GPU_POOL_TYPE=docker or
#          kubernetes creates that type instead (image: docker/Dockerfile.gpu, request one GPU per job).
#
# Usage:  PREFECT_API_URL=http://127.0.0.1:4200/api deployments/work-pools.sh
#         then on each host: prefect worker start --pool local
#                            prefect worker start --pool gpu --limit 1   (one engine per GPU at a time)
# `fcdpo deploy` creates the same two pools (process type) when they are missing.
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (fcdpo up prints it)}"
GPU_POOL_TYPE="${GPU_POOL_TYPE:-process}"
GPU_SLOTS="${GPU_SLOTS:-}"            # optional: cap concurrent gpu-pool flow runs across all workers

ensure_pool() {  # name type
  if prefect work-pool inspect "$1" >/dev/null 2>&1; then
    echo "work pool $1 exists"
  else
    prefect work-pool create "$1" --type "$2"
  fi
}

ensure_pool local process
ensure_pool gpu "$GPU_POOL_TYPE"
if [[ -n "$GPU_SLOTS" ]]; then
  prefect work-pool set-concurrency-limit gpu "$GPU_SLOTS"
fi
# tasks tagged `engine` (sample-shard, train-dpo, evaluate) load a model: at most one per slot
prefect concurrency-limit create engine "${ENGINE_SLOTS:-${GPU_SLOTS:-1}}" >/dev/null 2>&1 \
  || echo "concurrency limit 'engine' exists"
