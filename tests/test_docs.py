"""The docs site (mkdocs.yml, docs/) builds in strict mode, so a broken link, a missing page
or a page left out of the nav fails the suite; the README stays a front page; the config
reference, generated from the dataclasses, documents every key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

from lptrain.config.reference import render
from lptrain.config.schema import TrainConfig, _key

REPO = Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    home = (tmp_path / "index.html").read_text()
    assert "Set-up: the two commands" in home  # the README is the home page
    config = (tmp_path / "config" / "index.html").read_text()
    assert "bitswitch.hasb" in config and "min_sqnr_db" in config


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert "./scripts/setup.sh && .venv/bin/lptrain train recipes/pretrain/tiny-fp8.yaml" in lines
    assert "./scripts/setup.sh train,dev && .venv/bin/python -m pytest" in lines


def _key_paths(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{_key(f)}"
        tp = hints[f.name]
        out += _key_paths(tp, path + ".") if dataclasses.is_dataclass(tp) else [path]
    return out


def test_config_reference_documents_every_key():
    page = render()
    rows = {}
    section = None
    for line in page.splitlines():
        if line.startswith("## `"):
            section = line[4:-1]
        elif line.startswith("| `") and section is not None:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[f"{section}.{cells[0].strip('`')}"] = cells[-1]
    leaves = _key_paths(TrainConfig)
    assert sorted(set(leaves) - set(rows)) == []
    undocumented = sorted(p for p in leaves if not rows[p])
    assert undocumented == [], (
        f"add a comment to these fields in the config dataclasses: {undocumented}"
    )
