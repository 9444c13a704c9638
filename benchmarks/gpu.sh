#!/usr/bin/env bash
# The GPU benchmarks in one command: the first thing to run when a GPU is lent.
#   ./benchmarks/gpu.sh --quick   within 5 minutes (one H100/H200 GPU):
#       1. the Triton backend's capability self-test for every recipe on this GPU, and which
#          backend `backend: auto` picks for each recipes/pretrain/gpu-*.yaml
#       2. FP8 GEMM TFLOP/s against BF16 at 8192^3 (torch._scaled_mm; lptrain's matmul.gemm)
#   ./benchmarks/gpu.sh           the full tables of issue 14 (about 7 minutes):
#       1. fwd+bwd of one linear layer, every recipe x backend against BF16, torchao and TE
#       2. bandwidth of every quantize kernel against the GPU's copy bandwidth
#       3. tokens/s of the ~1B recipe for 200 steps, FP8 against BF16
# Prints markdown tables and keeps them in benchmarks/out/gpu[-quick]-<date>.md for
# BENCHMARKS.md. Run from anywhere (uses .venv/bin/python if present, else $PYTHON or python3).
# Each part has its own time limit so that one slow part cannot take the others down; the exit
# status is 1 when a part fails or runs out of time (--quick: also when a gpu-*.yaml's
# `backend: auto` would not get the Triton backend). Without a CUDA device it stops at once
# with one line, exit 2.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
case "${1:-}" in
    --quick) quick=1 ;;
    "") ;;
    *) echo "error: unknown argument '$1' (usage: benchmarks/gpu.sh [--quick])" >&2; exit 2 ;;
esac
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET  # the tests' CPU interpreter must never time a GPU run
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lptrain, whatever is installed
# One line for each way this machine cannot run them (no torch, no CUDA device); 60 s at most.
why=$(timeout 60 "$PY" -c "
import torch
print('' if torch.cuda.is_available() else 'no CUDA device visible to torch ' + torch.__version__)
" 2>&1 | tail -n 1)
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] || [ -n "$why" ]; then
    [ "$rc" -eq 124 ] && why="checking for a CUDA device took over 60 s"
    echo "error: $PY: ${why:-exit $rc} (these benchmarks measure GPU kernels)" >&2
    exit 2
fi
mkdir -p benchmarks/out
out="benchmarks/out/gpu$([ $quick = 1 ] && echo -quick)-$(date +%Y-%m-%d).md"
: > "$out"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$out" 2>/dev/null
failed=0
part() {  # part SECONDS SCRIPT ARGS...: run one benchmark, append its table
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" >&2
    timeout "$limit" "$PY" "$@" >> "$out"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "$* did not finish cleanly (exit $rc$([ "$rc" -eq 124 ] && echo ': time limit')); see its log above" | tee -a "$out" >&2
        failed=1
    fi
    echo >> "$out"
}
if [ $quick = 1 ]; then
    part 210 benchmarks/bench_gpu_quick.py selftest
    part 60 benchmarks/bench_gpu_quick.py gemm --size 8192
else
    part 80 benchmarks/bench_gpu_quantize.py
    part 180 benchmarks/bench_gpu_linear.py
    part 190 benchmarks/bench_gpu_train.py --steps 200 --recipes fp8-rowwise
fi
cat "$out"
echo "tables written to $out" >&2
exit $failed
