#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install lptrain with the extras given (default:
# train) at the exact versions in requirements.lock: the versions the test suite last passed
# with, so an upstream release cannot change a fresh clone.
#
#   ./scripts/setup.sh [EXTRAS] [--unlocked]
#
# --unlocked installs the newest releases pyproject.toml allows (what scripts/refresh_lock.sh
# tests before it rewrites the lock). The lock was made with the Python and torch it names in
# its header: with another Python minor version, or with a torch already installed at another
# version (a CUDA build of your own), the set-up says so in one line and installs unlocked.
# torch itself is installed (at the lock's version) only when the environment has none.
# LPTRAIN_VENV names the environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=train
locked=1
for arg in "$@"; do
    case "$arg" in
        --unlocked) locked=0 ;;
        -*) echo "setup: unknown option $arg (known: --unlocked)" >&2; exit 2 ;;
        *) extras=$arg ;;
    esac
done
venv=${LPTRAIN_VENV:-.venv}
lock=requirements.lock
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
install=("$py" -m pip install -q)
torch_locked=$(sed -n 's/^torch==//p' "$lock")
python_locked=$(sed -n 's/^# python: //p' "$lock")
python_here=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$locked" = 1 ] && [ "$python_here" != "$python_locked" ]; then
    echo "setup: Python $python_here is not the lock's $python_locked: installing the newest" \
        "allowed versions instead (untested)" >&2
    locked=0
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    "${install[@]}" "torch==$torch_locked"
elif [ "$locked" = 1 ]; then
    torch_here=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
    if [ "$torch_here" != "$torch_locked" ]; then
        echo "setup: torch $torch_here is installed, not the lock's $torch_locked: keeping it and" \
            "installing the newest allowed versions of the rest (untested)" >&2
        locked=0
    fi
fi
if [ "$locked" = 1 ]; then
    # The locked setuptools builds the editable install too (no isolated build environment,
    # which would fetch the newest setuptools).
    "${install[@]}" -c "$lock" setuptools
    "${install[@]}" -c "$lock" --no-build-isolation -e ".[${extras}]"
else
    "${install[@]}" -e ".[${extras}]"
fi
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
