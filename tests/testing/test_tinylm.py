"""A small transformer converted with each recipe trains on a fixed synthetic task.

150 steps of batch 16 (the whole file: about 90 s on 2 cores, most of it FP4): the model is at
its entropy floor by then (fp32 1.623, floor ~1.58), and 300 steps only doubled the suite's
biggest file. Each recipe must end within its precision's bound of the FP32 loss. Measured on
2026-12-07 (final loss / fp32 - 1): 8 bits and more at most +0.008% (fp8-block), mxfp6
+0.014%, 4 bits at most +0.075% (mxfp4); the bounds are 2-3x those. An FP8 recipe whose
grad_output quantizer forgot its scale (its small gradients flush to zero) ends +0.126% off and
must fail the 8-bit bound (the last test): the old flat 2% bound let it, and anything within
27x of the real spread, pass. Which recipes cost loss on real data is the loss study's question
(tests/trainer/test_loop_loss.py). benchmarks/bench_recipes_loss.py prints the table.
"""

from __future__ import annotations

import pytest

from lptrain import recipes
from lptrain.testing import tinylm

STEPS, BATCH = 150, 16
FOUR_BIT = {"mxfp4", "nvfp4", "quartet", "fp4-ue5m3"}
BOUND = {**dict.fromkeys(FOUR_BIT, 0.0015), "mxfp6": 0.0005}  # relative to the FP32 loss
EIGHT_BIT_BOUND = 0.00025  # bf16, FP8, MXFP8, MXINT8, INT16 DFP


@pytest.fixture(scope="module")
def fp32_loss() -> float:
    loss = tinylm.train("fp32", STEPS, batch=BATCH)
    assert loss < 2.0  # it learned: chance is ln 64 = 4.16, the entropy floor ~1.58
    return loss


@pytest.mark.parametrize("name", [n for n in recipes.names() if n != "fp32"])
def test_recipe_ends_within_its_bound_of_fp32(fp32_loss: float, name: str):
    loss = tinylm.train(name, STEPS, batch=BATCH)
    bound = BOUND.get(name, EIGHT_BIT_BOUND)
    assert abs(loss / fp32_loss - 1) < bound, f"{name}: {loss:.5f} vs fp32 {fp32_loss:.5f}"


def test_an_fp8_quantizer_without_its_scale_fails_the_bound(fp32_loss: float):
    unscaled = {"base": "fp8-current"}
    for gemm in ("grad_input", "grad_weight"):
        unscaled[gemm] = {"grad_output": {"scaling": "none"}}
    loss = tinylm.train(unscaled, STEPS, batch=BATCH)
    assert abs(loss / fp32_loss - 1) > 2 * EIGHT_BIT_BOUND, f"{loss:.5f} vs {fp32_loss:.5f}"
