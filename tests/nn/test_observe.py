"""Statistics windows, high-precision recomputation and in-place recipe switches
(nn/observe.py, Linear.set_recipe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lptrain import recipes
from lptrain.nn import Linear, disable_quantization, stats_window
from lptrain.numerics import fake_quantize


def _layer(recipe="mxfp8") -> Linear:
    torch.manual_seed(0)
    return Linear(64, 32, bias=False, recipe=recipe, seed=7)


def _inputs(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 64, generator=g) * (1 + 10 * i) for i in range(n)]


def test_window_merges_calls_like_one_tensor():
    # MXFP8 scales 32-blocks along each token row: two micro-batches quantize exactly as their
    # concatenation, so the window's merged statistics equal the concatenation's.
    lin = _layer()
    xs = _inputs()
    with stats_window({"lin": lin}) as got:
        for x in xs:
            lin(x.requires_grad_()).sum().backward()
    spec = lin.recipe.spec("output", "input")
    whole = fake_quantize(torch.cat(xs).detach(), spec, with_stats=True)[1]["stats"].as_dict()
    merged = got["lin"]["output.input"]
    assert merged["elements"] == whole["elements"] == 2 * 16 * 64
    assert merged["amax"] == whole["amax"] and merged["saturated"] == pytest.approx(
        whole["saturated"]
    )
    assert merged["sqnr_db"] == pytest.approx(whole["sqnr_db"], abs=1e-4)
    # Both backward GEMMs were seen too, and the window closed: no collection afterwards.
    assert {"grad_input.grad_output", "grad_weight.grad_output", "grad_weight.input"} <= set(
        got["lin"]
    )
    lin.last_stats.clear()
    lin(xs[0]).sum().backward()
    assert lin.last_stats == {}


def test_a_recomputed_forward_is_not_counted_twice():
    lin = _layer()
    x = _inputs(1)[0].requires_grad_()
    with stats_window({"lin": lin}) as got:
        checkpoint(lin, x, use_reentrant=False).sum().backward()
    assert got["lin"]["output.input"]["elements"] == 16 * 64


def test_collecting_changes_no_value():
    outs = []
    for collect in (False, True):
        lin = _layer("nvfp4")  # stochastic rounding in the backward: the streams must not move
        x = _inputs(1)[0].requires_grad_()
        with stats_window({"lin": lin} if collect else {}):
            lin(x).square().sum().backward()
        outs.append((x.grad, lin.weight.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_disable_quantization_is_plain_linear_and_restores():
    lin = _layer("nvfp4")
    x = _inputs(1)[0]
    with disable_quantization(torch.nn.Sequential(lin)):
        assert torch.equal(lin(x), F.linear(x, lin.weight))
        assert int(lin.step) == 0  # a plain call is no quantized call
    assert lin.quantization_enabled and not torch.equal(lin(x), F.linear(x, lin.weight))


def test_set_recipe_in_place_keeps_parameters_seed_and_counter():
    lin = _layer("fp8-delayed")
    weight = lin.weight
    for x in _inputs():
        lin(x).sum().backward()
    assert "quant_state.output_input.amax_history" in lin.state_dict()
    lin.set_recipe("nvfp4")
    assert lin.weight is weight and int(lin.seed) == 7 and int(lin.step) == 2
    assert lin.recipe == recipes.get("nvfp4") and lin.quant_state is None
    assert "signs_grad_weight" in lin.state_dict()
    lin(_inputs(1)[0]).sum().backward()
    assert int(lin.step) == 3
    lin.set_recipe("bf16")  # quantizes nothing: the plain GEMM
    x = _inputs(1)[0]
    assert torch.equal(lin(x), F.linear(x, weight))
