"""The package order of docs/layout.md, as `.importlinter` writes it, holds: `lint-imports`
passes, and it does fail when a package imports from a layer above it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(REPO / ".importlinter")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_documented_layers_hold():
    proc = _lint(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "lptrain", tmp_path / "lptrain", symlinks=True)
    schema = tmp_path / "lptrain" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom lptrain.trainer import loop  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "lptrain.config is not allowed to import lptrain.trainer" in proc.stdout
