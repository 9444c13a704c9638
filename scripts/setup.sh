#!/usr/bin/env bash
# Create (or reuse) .venv, install torch==2.13.0 only when torch is missing, then lptrain
# with the extras given as the first argument (default: train).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[${extras}]"
