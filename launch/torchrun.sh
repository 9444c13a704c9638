#!/usr/bin/env bash
# One node (or several, with NNODES/NODE_RANK/MASTER_ADDR set on each) through torchrun;
# DeepSpeed reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK environment.
# usage: launch/torchrun.sh NPROC RECIPE.yaml [--set k=v ...] [--run-dir DIR]
#   e.g. launch/torchrun.sh 8 recipes/pretrain/gpu-1b-fp8.yaml --run-dir runs/1b
#   two nodes: NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 8 RECIPE.yaml  (and
#              NODE_RANK=1 on the second node); give the same --run-dir on a shared filesystem.
set -euo pipefail
nproc="${1:?usage: $0 NPROC RECIPE.yaml [lptrain train options]}"; shift
nnodes="${NNODES:-1}"
if [ "$nnodes" = 1 ]; then
    rdzv=(--standalone)
else
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
          --rdzv_id "${RDZV_ID:-lptrain}")
fi
exec torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" "${rdzv[@]}" \
    -m lptrain train "$@"
