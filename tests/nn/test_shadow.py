"""Shadow statistics (nn/shadow.py): another recipe's numbers on a layer's operands."""

from __future__ import annotations

import pytest
import torch

from lptrain.nn import Linear, stats_window
from lptrain.nn.shadow import operands, unsupported
from lptrain.recipes import get


def _step(recipe: str, shadows=()):
    """One training call of a 64 -> 96 layer (seed 7) on fixed x and output gradient: its output,
    gradients and the window's statistics."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g).requires_grad_()
    dy = torch.randn(2, 16, 96, generator=g)
    layer = Linear(64, 96, bias=False, recipe=recipe, backend="emulated", seed=7)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 64, generator=g) * 0.05)
    with stats_window({"l": layer}, {"l": tuple(get(r) for r in shadows)}) as stats:
        y = layer(x)
        (y * dy).sum().backward()
    return y, x.grad, layer.weight.grad, stats["l"]


def test_shadows_change_nothing_the_layer_computes():
    y0, dx0, dw0, live = _step("fp8-current")
    y1, dx1, dw1, both = _step("fp8-current", ("mxfp8", "nvfp4"))
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and torch.equal(dw0, dw1)
    assert {k: v for k, v in both.items() if "/" not in k} == live
    assert {k for k in both if "/" in k} == {
        f"{r}/{g}.{op}" for r in ("mxfp8", "nvfp4") for g, op in operands(get(r))
    }


def test_a_shadow_records_what_a_layer_of_that_recipe_records():
    # MXFP8 rounds to nearest everywhere: its shadow on an fp8-current layer equals, bit for
    # bit, the statistics of an mxfp8 layer (same seed) on the same operands.
    *_, own = _step("mxfp8")
    *_, shadowed = _step("fp8-current", ("mxfp8",))
    assert {k: shadowed[f"mxfp8/{k}"] for k in own} == own
    # NVFP4: the forward operands round to nearest (a Hadamard with the layer's fixed signs on
    # the weight gradient's GEMM); the output gradient rounds stochastically from a stream of
    # the shadow's own, so there it agrees in distribution only.
    *_, own = _step("nvfp4")
    *_, shadowed = _step("fp8-current", ("nvfp4",))
    for key, want in own.items():
        got = shadowed[f"nvfp4/{key}"]
        if key.endswith("grad_output"):
            assert got["sqnr_db"] == pytest.approx(want["sqnr_db"], abs=0.5), key
            assert got["amax"] == want["amax"]
        else:
            assert got == want, key


def test_unsupported_shadows_say_why():
    assert unsupported(get("mxfp8")) is None
    assert "nothing" in unsupported(get("fp32"))
    assert "INT32" in unsupported(get("int16-dfp"))
    assert "reuse" in unsupported(get("quartet"))
