"""A small transformer converted with each recipe trains on a fixed synthetic copy task.

CPU time is the limit (the emulated FP4 recipes cost ~10x FP32 per step on this model), so the
FP8 recipes run the full comparison against FP32 and every other recipe a short smoke run.
benchmarks/bench_recipes_loss.py runs every recipe for longer and prints the table.
"""

from __future__ import annotations

import math

import pytest
import tinylm

from lptrain.nn import recipes

STEPS, SMOKE_STEPS, BATCH = 150, 15, 16
FP8 = ("fp8-current", "fp8-delayed")


@pytest.fixture(scope="module")
def fp32_loss() -> float:
    return tinylm.train("fp32", STEPS, batch=BATCH)


@pytest.mark.parametrize("name", FP8)
def test_fp8_recipes_end_within_2_percent_of_fp32(fp32_loss: float, name: str):
    loss = tinylm.train(name, STEPS, batch=BATCH)
    assert fp32_loss < math.log(tinylm.VOCAB) - 0.08  # learning (measured 4.04 vs 4.16)
    assert abs(loss / fp32_loss - 1) < 0.02, f"{name}: {loss:.4f} vs fp32 {fp32_loss:.4f}"


@pytest.mark.parametrize("name", [n for n in recipes.names() if n not in FP8 + ("fp32",)])
def test_every_other_recipe_trains(name: str):
    start = tinylm.train(name, 1, batch=BATCH)
    loss = tinylm.train(name, SMOKE_STEPS, batch=BATCH, lr=1e-2)
    assert math.isfinite(loss) and loss < start, f"{name}: {start:.4f} -> {loss:.4f}"
