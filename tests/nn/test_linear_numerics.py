"""The three GEMMs of lptrain.nn.Linear against float64, per named recipe, and exact cases.

SQNR thresholds sit ~2 dB below the values measured on the fixed problem of conftest.Problem
(x ~ N(0, 1), w ~ N(0, 1/K), dy ~ N(0, 1)); an upper bound 8 dB above checks that the recipe
really quantizes (a quantizer that silently passes FP32 through gives ~130 dB).
"""

from __future__ import annotations

import copy

import pytest
import torch
from lptrain.testing import Problem, sqnr_db
from torch import nn

from lptrain import recipes
from lptrain.nn import Linear

# recipe: minimum SQNR (dB) of (output, grad_input, grad_weight). Measured (y, dx, dw):
# fp8 E4M3 fwd ~28.5, E5M2 grads ~24.6; row/block E4M3 ~28.5; mxfp8 ~27.5; mxfp6 27.9/24.3;
# mxfp4 15.7/14.3; nvfp4 16.7/15.0/15.7; quartet 12.7/8.5/8.8 (double quantization + 4/3
# headroom in backward); fp4-ue5m3 17.4/15.6/15.7; int16-dfp ~81; mxint8 ~38.7.
MIN_SQNR = {
    "fp8-delayed": (26.5, 22.5, 22.5),
    "fp8-current": (26.5, 22.5, 22.5),
    "fp8-rowwise": (26.5, 26.5, 26.5),
    "fp8-block": (26.5, 26.5, 26.5),
    "mxfp8": (25.5, 25.5, 25.5),
    "mxfp6": (26.0, 22.5, 22.5),
    "mxfp4": (14.0, 12.5, 12.5),
    "nvfp4": (15.0, 13.0, 13.5),
    "quartet": (11.0, 7.0, 7.0),
    "fp4-ue5m3": (15.5, 13.5, 13.5),
    "int16-dfp": (78.0, 78.0, 77.0),
    "mxint8": (36.5, 36.5, 36.5),
}
UNQUANTIZED = ("fp32", "bf16")


def test_every_recipe_has_a_threshold():
    assert set(MIN_SQNR) | set(UNQUANTIZED) == set(recipes.names())


@pytest.mark.parametrize("name", sorted(MIN_SQNR))
def test_sqnr_vs_float64(problem: Problem, name: str):
    lin = problem.layer(name)
    if name == "fp8-delayed":  # step 1 uses the initial scale 1; measure the scaled step
        problem.run(lin)
    y, dx, dw = problem.run(lin)
    got = (sqnr_db(y, problem.y_ref), sqnr_db(dx, problem.dx_ref), sqnr_db(dw, problem.dw_ref))
    for gemm, s, lo in zip(
        ("output", "grad_input", "grad_weight"), got, MIN_SQNR[name], strict=True
    ):
        assert lo <= s <= lo + 8.0, f"{name} {gemm}: SQNR {s:.2f} dB outside [{lo}, {lo + 8}]"


@pytest.mark.parametrize("name", UNQUANTIZED)
def test_unquantized_recipes_are_exactly_nn_linear(name: str):
    torch.manual_seed(0)
    ref = nn.Linear(48, 40)
    lin = Linear.from_float(copy.deepcopy(ref), name)
    x = torch.randn(3, 7, 48)
    dy = torch.randn(3, 7, 40)
    outs = []
    for m in (ref, lin):
        xx = x.clone().requires_grad_()
        y = m(xx)
        y.backward(dy)
        outs.append((y, xx.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_fp8_current_scale_maps_amax_to_e4m3_max(problem: Problem):
    # The largest |x| lands on +-448 exactly: per-tensor current scaling, not some other rule.
    lin = problem.layer("fp8-current")
    call = lin._context(0, training=False)
    qx = lin.backend.gemm(call, "output", problem.x, problem.w, generator=None, signs=None).qa
    i = problem.x.abs().argmax()
    amax = problem.x.abs().max()
    assert qx.flatten()[i].abs() == amax
    enc = 448.0 / amax
    assert torch.equal(qx, (problem.x * enc).to(torch.float8_e4m3fn).float() * (1.0 / enc))


def test_wgrad_high_precision_is_exact_for_grad_weight(problem: Problem):
    r = recipes.get("fp8-current")
    r = r.replace(name="fp8-hp-wgrad", grad_weight=type(r.grad_weight)(), wgrad_high_precision=True)
    _, _, dw = problem.run(problem.layer(r))
    assert torch.allclose(dw, (problem.dy.T @ problem.x), rtol=0, atol=0)


def test_bias_is_added_in_high_precision():
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    with torch.no_grad():
        ref.bias.fill_(1e-3)
    lin = Linear.from_float(copy.deepcopy(ref), "fp8-current")
    no_bias = Linear.from_float(nn.Linear(64, 32, bias=False), "fp8-current")
    with torch.no_grad():
        no_bias.weight.copy_(ref.weight)
    x = torch.randn(16, 64)
    assert torch.equal(lin(x), no_bias(x) + ref.bias)


def test_wrong_input_shape_names_the_shape():
    lin = Linear(64, 32, recipe="fp8-current")
    with pytest.raises(ValueError, match=r"expected input with last dim 64.*\(4, 63\)"):
        lin(torch.randn(4, 63))


def test_odd_shapes_are_padded_for_block_recipes():
    # 3x5x40 tokens x 40 features: not a multiple of the 16/32/128 blocks or the Hadamard.
    torch.manual_seed(0)
    x = torch.randn(3, 5, 40)
    w = torch.randn(24, 40) / 40**0.5
    for name in ("mxfp4", "nvfp4", "quartet", "fp4-ue5m3", "fp8-block"):
        lin = Linear(40, 24, bias=False, recipe=name)
        with torch.no_grad():
            lin.weight.copy_(w)
        xx = x.clone().requires_grad_()
        y = lin(xx)
        y.sum().backward()
        assert y.shape == (3, 5, 24) and xx.grad.shape == x.shape
        assert sqnr_db(y, x.double() @ w.double().T) > 8, name
        assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("name", sorted(MIN_SQNR))
def test_reused_backward_copies_equal_requantizing(name: str, monkeypatch):
    """Where the backward reuses a forward-quantized copy (per-tensor scaling, square weight
    tiles), the result is bit for bit that of quantizing again; odd shapes exercise padding."""
    import lptrain.nn.linear as linear_mod

    recipe = recipes.get(name)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 50, 200, generator=g), torch.randn(136, 200, generator=g) * 0.07
    dys = [torch.randn(3, 50, 136, generator=g) for _ in range(3)]

    def run(lin: Linear):
        with torch.no_grad():
            lin.weight.copy_(w)
        outs = []
        for dy in dys:  # three steps: delayed scaling's histories must stay in step too
            lin.weight.grad = None
            xx = x.clone().requires_grad_()
            y = lin(xx)
            y.backward(dy)
            outs.append((y, xx.grad, lin.weight.grad.clone()))
        return outs

    aliased = Linear(200, 136, bias=False, recipe=recipe, seed=0)
    monkeypatch.setattr(linear_mod, "reuse_aliases", lambda recipe: {})
    plain = Linear(200, 136, bias=False, recipe=recipe, seed=0)
    assert plain.aliases == {}
    reusing = {"fp8-current", "fp8-delayed", "fp8-block", "nvfp4"}
    assert bool(aliased.aliases) == (name in reusing), aliased.aliases
    for step, (a, b) in enumerate(zip(run(aliased), run(plain), strict=True)):
        for what, u, v in zip(("output", "grad_input", "grad_weight"), a, b, strict=True):
            assert torch.equal(u, v), f"{name} step {step}: {what} differs"
