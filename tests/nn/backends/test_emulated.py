"""The emulated backend (nn/backends/emulated.py): torchao parity, padding of odd shapes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lptrain
from lptrain.nn import Linear
from lptrain.testing import sqnr_db


def _fwd_bwd(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    xx = x.clone().requires_grad_()
    y = model(xx)
    y.backward(dy)
    lin = model[0]
    return y.detach(), xx.grad, lin.weight.grad, lin.bias.grad


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_fp8_current_matches_torchao_emulated_float8linear(scale: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf8 = pytest.importorskip("torchao.float8")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 384))
    ao = tf8.convert_to_float8_training(
        copy.deepcopy(base), config=tf8.Float8LinearConfig(emulate=True)
    )
    assert type(ao[0]).__name__ == "Float8Linear"
    ours = lptrain.convert(copy.deepcopy(base), "fp8-current")
    x = torch.randn(4, 64, 512) * 3 * scale  # 256 tokens, non-unit amaxes
    dy = torch.randn(4, 64, 384) * 1e-3
    got, want = _fwd_bwd(ours, x, dy), _fwd_bwd(ao, x, dy)
    # Same fake-quantized operands; torchao applies the two scales after its matmul, we before:
    # only FP32 rounding of the accumulation differs (measured ~2e-7 of the norm).
    for what, a, b in zip(("output", "grad_input", "grad_weight", "bias"), got, want, strict=True):
        rel = float((a - b).norm() / b.norm())
        assert rel < 1e-5, f"{what}: relative difference {rel:.2e}"
    # And each one is really FP8 (not FP32): far from the unquantized result.
    b = base[0].bias.detach()
    assert 20 < sqnr_db(got[0] - b, base(x).detach() - b) < 40


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
