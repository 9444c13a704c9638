#!/usr/bin/env bash
# Several nodes from a hostfile (`hostname slots=GPUS` per line) with the DeepSpeed launcher
# over pdsh/ssh. pdsh forwards only NCCL*/PYTHON*/UCX* variables, so WANDB_*, HF_* and
# DS_ACCELERATOR are written to ./.deepspeed_env, which the launcher ships to every node. It
# holds secrets (WANDB_API_KEY, HF_TOKEN): it is made anew readable by its owner only (0600)
# and is in .gitignore. LPTRAIN_DRY_RUN=1 writes it and prints the command instead of running it.
# Needs passwordless ssh to every host and the same checkout path and run dir on all of them.
# usage: launch/multi_node.sh HOSTFILE RECIPE.yaml [--set k=v ...] --run-dir /shared/runs/NAME
#   e.g. launch/multi_node.sh hostfile recipes/pretrain/gpu-1b-fp8.yaml --run-dir /shared/runs/1b
set -euo pipefail
hostfile="${1:?usage: $0 HOSTFILE RECIPE.yaml [lptrain train options]}"; shift
# Removed first: truncating an existing file would keep its old mode. The umask is set in a
# subshell so that what the run writes later keeps the caller's.
rm -f .deepspeed_env
(
    umask 077
    env | grep -E '^(WANDB_|HF_|DS_ACCELERATOR=|TOKENIZERS_PARALLELISM=)' > .deepspeed_env || true
)
cmd=(deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
     --module lptrain train "$@")
if [ -n "${LPTRAIN_DRY_RUN:-}" ]; then
    echo "${cmd[@]}"
    exit 0
fi
exec "${cmd[@]}"
