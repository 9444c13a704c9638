#!/usr/bin/env bash
# The GPU benchmarks of issue 14 in one command (about 7 minutes on one H100/H200 GPU):
#   1. fwd+bwd of one linear layer, every recipe x backend against BF16, torchao and TE
#   2. bandwidth of every quantize kernel against the GPU's copy bandwidth
#   3. tokens/s of the ~1B recipe for 200 steps, FP8 against BF16
# Prints the three markdown tables and keeps them in benchmarks/out/gpu-<date>.md for
# BENCHMARKS.md. Run from anywhere: ./benchmarks/gpu.sh (uses .venv/bin/python if present).
# Each part has its own time limit so that one slow part cannot take the others down.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PY (these benchmarks measure GPU kernels)" >&2
    exit 2
fi
unset TRITON_INTERPRET  # the tests' CPU interpreter must never time a GPU run
mkdir -p benchmarks/out
out="benchmarks/out/gpu-$(date +%Y-%m-%d).md"
: > "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$out" 2>/dev/null
part() {  # part SECONDS SCRIPT ARGS...: run one benchmark, append its table
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" >&2
    if ! timeout "$limit" "$PY" "$@" >> "$out"; then
        echo "$* did not finish (exit $?); see its log above" | tee -a "$out" >&2
    fi
    echo >> "$out"
}
part 80 benchmarks/bench_gpu_quantize.py
part 180 benchmarks/bench_gpu_linear.py
part 190 benchmarks/bench_gpu_train.py --steps 200 --recipes fp8-rowwise
cat "$out"
echo "tables written to $out" >&2
