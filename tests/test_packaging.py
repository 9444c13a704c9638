"""Packaging (pyproject.toml): every package under lptrain/ ships, kernels/ ships as
lptrain.kernels, the recipe files ship as lptrain.recipe_files, and no folder of the
repository shadows an installed distribution's import name (from the repository root, where
the README has users work, or under pytest)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from lptrain.cli import recipe_files

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lptrain").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject.toml: {sorted(on_disk - listed)}"
    assert cfg["package-dir"] == {"lptrain.recipe_files": "recipes"}
    # lptrain.kernels is kernels/ through a symlink, and a namespace package (no __init__.py)
    assert (REPO / "lptrain" / "kernels").resolve() == REPO / "kernels"
    assert "lptrain.kernels" in listed and not (REPO / "kernels" / "__init__.py").exists()


def _ours(path: Path) -> bool:
    """Inside the repository's own files (a .venv/ in the checkout is not ours)."""
    path = Path(path).resolve()
    return path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())


def _installed_import_names() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions (other than lptrain) providing it."""
    names = importlib.metadata.packages_distributions()
    return {n: d for n, d in names.items() if "lptrain" not in d}


def _folders() -> list[Path]:
    """The top-level folders of the repository and of tests/."""
    tops = [REPO, REPO / "tests"]
    return [
        p for top in tops for p in sorted(top.iterdir()) if p.is_dir() and p.name[0] not in "._"
    ]


def test_pytest_puts_the_repository_root_on_the_path_not_tests():
    # tests/ is a package, so pytest imports tests.kernels.test_fp8 (not kernels.test_fp8) and
    # inserts the repository root, not tests/, into sys.path.
    assert (REPO / "tests" / "__init__.py").is_file()
    assert str(REPO / "tests") not in sys.path
    assert __name__ == "tests.test_packaging"


def test_no_folder_is_an_importable_package_under_an_installed_name():
    installed = _installed_import_names()
    clashes = []
    for folder in _folders():
        if folder.name not in installed:
            continue
        if folder.parent == REPO and (folder / "__init__.py").exists():
            clashes.append(
                f"{folder.relative_to(REPO)}/ is a package named like {installed[folder.name]}"
            )
    for entry in {
        REPO,
        *(Path(p) for p in sys.path if p and _ours(p)),
    }:
        for name in installed:
            for shadow in (entry / name / "__init__.py", entry / f"{name}.py"):
                if shadow.exists():
                    clashes.append(f"{shadow.relative_to(REPO)} shadows {installed[name]}")
    assert not clashes, clashes


def test_installed_names_import_from_the_repository_root():
    """What a user gets with `python` started in the repository root: every folder named like
    an installed distribution's import name (kernels/ and the `kernels` distribution that
    transformers needs) yields to the distribution."""
    installed = _installed_import_names()
    names = sorted({f.name for f in _folders() if f.name in installed})
    code = "import importlib, sys\n"
    code += "for n in sys.argv[1:]:\n"
    code += "    m = importlib.import_module(n)\n"
    code += "    print(n, m.__spec__.origin or list(m.__path__)[0])\n"
    out = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        name, origin = line.split(" ", 1)
        assert not _ours(origin), f"{name} imports {origin}"
    assert len(out.splitlines()) == len(names)


def test_transformers_models_import_from_the_repository_root():
    pytest.importorskip("transformers")
    code = "from transformers import LlamaForCausalLM, GPT2LMHeadModel; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_recipe_files_are_found_through_the_package():
    names = [name for name, _ in recipe_files()]
    assert "recipes/pretrain/tiny-fp8.yaml" in names
    on_disk = sorted(f"recipes/{p.relative_to(REPO / 'recipes').as_posix()}"
                     for p in (REPO / "recipes").rglob("*.yaml"))  # fmt: skip
    assert names == on_disk
