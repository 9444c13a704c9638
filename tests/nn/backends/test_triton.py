"""The Triton backend (nn/backends/triton.py) against the emulated backend, through
lptrain.nn.Linear: every recipe's three GEMMs within the accumulation bound (round to nearest)
or at the emulated backend's accuracy (stochastic rounding, a different random stream);
quantizer state bit for bit; FP8 operands saved for backward as codes with their transpose;
the weight cache across micro-batches; reproducible, replay-exact stochastic rounding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lptrain import recipes
from lptrain.nn import Linear
from lptrain.testing import sqnr_db

from .conftest import DEVICE

triton = pytest.importorskip("triton")

U = 2.0**-24
T, K, N = 64, 128, 64


def _backend():
    from lptrain.nn.backends.triton import TritonBackend

    return TritonBackend()


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) * K**-0.5
    dy = torch.randn(T, N, generator=g)
    return x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE)


def _layer(recipe, backend, w, **kw) -> Linear:
    lin = Linear(K, N, bias=False, recipe=recipe, backend=backend, seed=5, device=DEVICE, **kw)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _run(lin: Linear, x, dy):
    xx = x.clone().requires_grad_()
    y = lin(xx)
    y.backward(dy)
    return y.detach(), xx.grad, lin.weight.grad


def _stochastic(recipe, gemm: str) -> bool:
    gr = recipes.get(recipe).gemm(gemm)
    return any(s is not None and s.rounding == "stochastic" for s in (gr.a, gr.b))


QUANTIZED = [n for n in recipes.names() if recipes.get(n).quantizes]


@pytest.mark.parametrize("name", QUANTIZED)
def test_every_recipe_matches_the_emulated_backend(name: str):
    x, w, dy = _data()
    emu = _run(_layer(name, "emulated", w), x, dy)
    tri = _run(_layer(name, (_backend(), "test"), w), x, dy)
    # |C - C_emulated| <= (2k + 16) u |A^||B^|^T (matmul.py); round to nearest gives
    # |A^| <= 2 |A| (in the rotated domain when there is a Hadamard) and Cauchy-Schwarz with
    # the rotation's orthogonality gives sum |a^||b^| <= 4 |a|_2 |b|_2 per output element.
    refs = {"output": (x, w.T), "grad_input": (dy, w), "grad_weight": (dy.T, x)}
    for (gemm, (a, b)), got, want in zip(refs.items(), tri, emu, strict=True):
        if _stochastic(name, gemm) or (gemm != "output" and recipes.get(name).trust_mask):
            # a different random stream: the same accuracy, not the same numbers
            exact = a.double() @ b.double()
            assert abs(sqnr_db(got, exact) - sqnr_db(want, exact)) < 1.5, (name, gemm)
            continue
        k = a.shape[1]
        norms = a.double().norm(dim=1)[:, None] * b.double().norm(dim=0)[None, :]
        lim = 4 * (2 * k + 16) * U * norms
        assert bool(((got.double() - want.double()).abs() <= lim).all()), (name, gemm)


def test_fp8_operands_are_saved_as_codes_with_their_transpose():
    from lptrain.nn.backends.operand import QuantizedOperand

    x, w, dy = _data()
    lin = _layer("fp8-current", (_backend(), "test"), w)
    y = lin(x.clone().requires_grad_())
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert saved and all(isinstance(t, QuantizedOperand) for t in saved)
    for t in saved:  # X for wgrad and W for dgrad: 1-byte codes and their transposed copy
        assert t.op.values.dtype == torch.float8_e4m3fn and t.op.values_t is not None
    y.backward(dy)  # consumed through the transposed codes


def test_quantizer_state_is_updated_exactly_as_the_reference_does():
    x, w, dy = _data()
    for name, kw in (("fp8-delayed", {}), ("fp4-ue5m3", {"amax_refresh": 2})):
        recipe = recipes.get(name)
        if kw:  # sample-and-hold of the two-level tensor reference
            recipe = recipes.from_dict({"base": name, "output": {"input": kw, "weight": kw}})
        emu, tri = _layer(recipe, "emulated", w), _layer(recipe, (_backend(), "test"), w)
        for step in range(3):
            xs = x * (step + 1)
            _run(emu, xs, dy)
            _run(tri, xs, dy)
        es, ts = emu.state_dict(), tri.state_dict()
        assert es.keys() == ts.keys()
        for key in es:
            if "quant_state" in key:
                assert torch.equal(es[key], ts[key]), (name, key)


def test_weight_cache_across_micro_batches():
    x, w, dy = _data()
    backend = _backend()
    backend.cache_weights = True
    calls = []
    real = backend.quantize_operand
    backend.quantize_operand = lambda t, spec, **kw: calls.append(spec) or real(t, spec, **kw)
    # mxfp8 quantizes W along K (fprop) and W^T along N (dgrad): two cacheable copies
    lin = _layer("mxfp8", (backend, "test"), w)
    plain = _layer("mxfp8", (_backend(), "test"), w)
    first = _run(lin, x, dy)
    n_first = len(calls)
    calls.clear()
    lin.weight.grad = None
    second = _run(lin, x, dy)  # weight unchanged: both copies come from the cache
    assert len(calls) == n_first - 2
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    want = _run(plain, x, dy)
    assert all(torch.equal(a, b) for a, b in zip(second[:2], want[:2], strict=True))
    with torch.no_grad():  # an optimizer's in-place update bumps the version counter
        lin.weight.add_(1e-3)
    calls.clear()
    _run(lin, x, dy)
    assert len(calls) == n_first
    backend.after_step()  # what the trainer calls after every optimizer step
    assert not backend._cache


def test_stochastic_rounding_is_reproducible_and_replays_exactly():
    x, w, dy = _data()
    runs = []
    for _ in range(2):
        lin = _layer("nvfp4", (_backend(), "test"), w)
        xx = x.clone().requires_grad_()
        y = checkpoint(lin, xx, use_reentrant=False)  # the backward recomputes the forward
        y.backward(dy)
        runs.append((y.detach(), xx.grad, lin.weight.grad, int(lin.step)))
    (y0, dx0, dw0, s0), (y1, dx1, dw1, s1) = runs
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and torch.equal(dw0, dw1)
    assert s0 == s1 == 1  # the replay advanced nothing


def test_statistics_float64_and_empty_batches():
    x, w, dy = _data()
    lin = _layer("mxfp8", (_backend(), "test"), w)
    lin.collect_stats(1)
    _run(lin, x, dy)
    assert "output.input" in lin.last_stats  # collected by the reference path
    lin64 = _layer("fp8-current", (_backend(), "test"), w.double(), dtype=torch.float64)
    y, dx, dw = _run(lin64, x.double(), dy.double())
    assert y.dtype == dx.dtype == dw.dtype == torch.float64
    y, dx, dw = _run(_layer("nvfp4", (_backend(), "test"), w), x[:0], dy[:0])
    assert y.shape == (0, N) and dx.shape == (0, K) and not dw.any()


def test_rowwise_dy_is_read_once_for_both_backward_gemms():
    x, w, dy = _data()
    backend = _backend()
    calls = []
    real = backend.quantize_operand
    backend.quantize_operand = lambda t, spec, **kw: (
        calls.append(kw["want_t"]) or real(t, spec, **kw)
    )
    lin = _layer("fp8-rowwise", (backend, "test"), w)
    got = _run(lin, x, dy)
    # X, W (fprop); dY with its column-wise copy, W^T (dgrad); X^T (wgrad): dY^T is not requantized
    assert calls == [False, False, True, False, False]
    emu = _run(_layer("fp8-rowwise", "emulated", w), x, dy)
    lim = 4 * (2 * T + 16) * U * (dy.double().T.norm(dim=1)[:, None] * x.double().norm(dim=0))
    assert bool(((got[2].double() - emu[2].double()).abs() <= lim).all())
    assert not backend._colwise  # consumed


@pytest.mark.parametrize("name", ["fp8-current", "fp8-rowwise", "mxfp8", "nvfp4", "int16-dfp"])
def test_non_finite_inputs_reach_the_same_outputs_as_emulated(name: str):
    x, w, dy = _data()
    x[3, 7] = float("nan")
    dy[5, 2] = float("inf")
    emu = _run(_layer(name, "emulated", w), x, dy)
    tri = _run(_layer(name, (_backend(), "test"), w), x, dy)
    for what, a, b in zip(("y", "dx", "dw"), tri, emu, strict=True):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (name, what)
        assert not bool(torch.isfinite(a).all()), (name, what)  # it propagates
