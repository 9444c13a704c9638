"""nn/backends/matmul.py: the FP8 GEMM (torch._scaled_mm, tensorwise and rowwise scales) and the
dense fallback against the FP64 product of the fake-quantized operands, within the stated
accumulation bound; which path each pair takes; empty operands."""

from __future__ import annotations

import pytest
import torch

from lptrain.nn.backends import matmul as mm
from lptrain.nn.backends.operand import Operand

from .conftest import DEVICE


def _fp8(rows: int, k: int, fmt, seed: int, rowwise: bool) -> Operand:
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randn(rows, k, generator=g) * 30).to(fmt)
    scale = torch.rand(rows, 1, generator=g) + 0.5 if rowwise else torch.tensor(0.037)
    return Operand(values=codes.to(DEVICE), scale=scale.to(DEVICE))


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("fmts", [(torch.float8_e4m3fn,) * 2,
                                  (torch.float8_e5m2, torch.float8_e4m3fn),
                                  (torch.float8_e5m2,) * 2])  # fmt: skip
def test_fp8_gemm_within_the_bound(rowwise: bool, fmts):
    a, b = _fp8(48, 96, fmts[0], 1, rowwise), _fp8(40, 96, fmts[1], 2, rowwise)
    assert mm.fp8_gemm_ok(a, b) == (fmts != (torch.float8_e5m2,) * 2)  # no E5M2 x E5M2 kernel
    got = mm.gemm(a, b)
    fa, fb = a.dequantize(), b.dequantize()
    err = (got.double() - fa.double() @ fb.double().T).abs()
    assert got.dtype == torch.float32 and bool((err <= mm.bound(fa, fb)).all())


def test_dense_path_with_block_and_tensor_scales():
    g = torch.Generator().manual_seed(3)
    da = (torch.randn(32, 64, generator=g) * 4).round().to(torch.bfloat16)  # exact values
    db = (torch.randn(16, 64, generator=g) * 4).round().to(torch.bfloat16)
    a = Operand(values=da.to(DEVICE), gscale=torch.tensor(1 / 3, device=DEVICE))
    b = Operand(values=db.to(DEVICE), gscale=torch.tensor(0.7, device=DEVICE))
    got = mm.gemm(a, b)
    fa, fb = a.dequantize(), b.dequantize()
    err = (got.double() - fa.double() @ fb.double().T).abs()
    assert not mm.fp8_gemm_ok(a, b) and bool((err <= mm.bound(fa, fb)).all())


def test_bound_is_tight_enough_to_catch_a_wrong_scale():
    a, b = _fp8(48, 96, torch.float8_e4m3fn, 1, False), _fp8(40, 96, torch.float8_e4m3fn, 2, False)
    fa, fb = a.dequantize(), b.dequantize()
    wrong = mm.gemm(Operand(a.values, a.scale * (1 + 2**-10)), b)  # a 0.1% scale error
    assert not bool(
        ((wrong.double() - fa.double() @ fb.double().T).abs() <= mm.bound(fa, fb)).all()
    )


def test_empty_operands():
    a = Operand(values=torch.empty(0, 32, device=DEVICE))
    b = Operand(values=torch.ones(8, 32, device=DEVICE))
    assert mm.gemm(a, b).shape == (0, 8)
    assert not mm.gemm(Operand(torch.empty(4, 0)), Operand(torch.empty(8, 0))).any()
