#!/usr/bin/env bash
# Move requirements.lock to the newest releases pyproject.toml allows, after the test suite
# passes on them: an upstream release arrives as a reviewed lock diff, not as a red fresh clone.
#
#   ./scripts/refresh_lock.sh [PYTEST ARGS]
#
# Builds a fresh environment in .venv-refresh/ with `setup.sh train,dev --unlocked` (torch
# stays at the lock's version), prints the diff against the current lock, runs the suite with
# it, and rewrites requirements.lock only when the suite passes. Exit status: the suite's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-refresh
rm -rf "$venv"
LPTRAIN_VENV=$venv ./scripts/setup.sh train,dev --unlocked
new=$(mktemp)
{
    echo "# requirements.lock: the exact versions the test suite last passed with. scripts/setup.sh"
    echo "# installs with it as pip constraints; scripts/refresh_lock.sh rewrites it (README, Set-up)."
    echo "# python: $("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    echo "# platform: $(uname -s) $(uname -m)"
    echo "# made: $(date -u +%Y-%m-%d) by scripts/refresh_lock.sh"
    # Every installed distribution but pip and lptrain itself; torch without its local build
    # label (2.13.0+cpu -> 2.13.0), so a CUDA build of the same release also matches.
    "$venv/bin/python" -m pip freeze --all --exclude-editable \
        | grep -v -i -E '^(pip|lptrain)==' | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f
} > "$new"
echo "refresh: changes to requirements.lock:"
diff -u requirements.lock "$new" | grep -E '^[-+][^-+#]' || echo "  (none)"
if "$venv/bin/python" -m pytest "$@"; then
    cat "$new" > requirements.lock && rm -f "$new"  # keeps the file's mode (mktemp makes 0600)
    echo "refresh: the suite passed; requirements.lock rewritten (review the diff, then commit it)"
else
    status=$?
    echo "refresh: the suite failed on the newest releases; requirements.lock unchanged" >&2
    exit "$status"
fi
