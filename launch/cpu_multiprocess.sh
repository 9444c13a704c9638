#!/usr/bin/env bash
# Data parallel on one CPU machine: N processes, gloo, one thread each (torchrun).
# usage: launch/cpu_multiprocess.sh NPROC RECIPE.yaml [--set k=v ...] [--run-dir DIR]
#   e.g. launch/cpu_multiprocess.sh 2 recipes/pretrain/tiny-fp32.yaml --set deepspeed.zero_stage=2
set -euo pipefail
nproc="${1:?usage: $0 NPROC RECIPE.yaml [lptrain train options]}"; shift
export DS_ACCELERATOR=cpu
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
exec torchrun --standalone --nnodes 1 --nproc_per_node "$nproc" -m lptrain train "$@"
