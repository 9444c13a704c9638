#!/usr/bin/env bash
# One node, N processes, with the DeepSpeed launcher (which passes --local_rank=N; lptrain
# accepts it). On a CPU-only machine DS_ACCELERATOR=cpu and gloo are used.
# usage: launch/single_node.sh NPROC RECIPE.yaml [--set k=v ...] [--run-dir DIR]
#   e.g. launch/single_node.sh 8 recipes/pretrain/gpu-125m-fp8.yaml --run-dir runs/125m
set -euo pipefail
nproc="${1:?usage: $0 NPROC RECIPE.yaml [lptrain train options]}"; shift
port="${MASTER_PORT:-29500}"
exec deepspeed --num_accelerators "$nproc" --master_port "$port" \
    --module lptrain train "$@"
