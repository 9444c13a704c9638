"""examples/minimal_loop.py runs as a user runs it and learns: a converted model in plain
PyTorch. 30 steps (seconds): the byte loss falls from ln 256 = 5.55 to below 3.6."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minimal_loop.py"


@pytest.mark.parametrize("recipe", ["fp8-current", "nvfp4"])
def test_the_minimal_loop_trains_a_converted_model(recipe, capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    loss = main(["--recipe", recipe, "--steps", "30", "--batch", "8"])
    out = capsys.readouterr().out
    assert f"layers to {recipe}" in out and "skipped 1: lm_head" in out
    assert loss < 3.6, out
