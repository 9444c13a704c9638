"""Packaging (pyproject.toml): every package under lptrain/ ships, kernels/ ships as
lptrain.kernels, the recipe files ship as lptrain.recipe_files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lptrain.train.cli import recipe_files

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lptrain").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject.toml: {sorted(on_disk - listed)}"
    assert cfg["package-dir"] == {"lptrain.kernels": "kernels", "lptrain.recipe_files": "recipes"}


def test_recipe_files_are_found_through_the_package():
    names = [name for name, _ in recipe_files()]
    assert "recipes/pretrain/tiny-fp8.yaml" in names
    on_disk = sorted(f"recipes/{p.relative_to(REPO / 'recipes').as_posix()}"
                     for p in (REPO / "recipes").rglob("*.yaml"))  # fmt: skip
    assert names == on_disk
