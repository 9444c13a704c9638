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
# The report's browser test renders the HTML page in headless Chromium (Debian's package).
# Installed for the dev extra when missing; never fatal: without it that test skips, saying why.
if [[ ",${extras}," == *",dev,"* ]] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
            >/dev/null 2>&1 || echo "setup: chromium not installed (the report's browser test will skip)" >&2
    else
        echo "setup: no chromium and no root apt-get (the report's browser test will skip)" >&2
    fi
fi
