"""nn/backends/operand.py: a QuantizedOperand is its fake-quantized FP32 value to every op, while
transposes and slices stay in low precision (FP8 codes, the transposed copy, row scales)."""

from __future__ import annotations

import torch

from lptrain.nn.backends.operand import Operand, QuantizedOperand, operand_of, plain


def _fp8_op(rowwise: bool = False) -> Operand:
    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(6, 10, generator=g) * 20).to(torch.float8_e4m3fn)
    if rowwise:
        return Operand(values=codes, scale=torch.rand(6, 1, generator=g))
    return Operand(values=codes, scale=torch.tensor(0.25), values_t=codes.t().contiguous())


def test_value_is_the_dequantized_operand():
    op = _fp8_op()
    q = QuantizedOperand(op)
    want = op.values.float() * op.scale
    assert q.shape == (6, 10) and q.dtype == torch.float32
    assert torch.equal(q + 0, want) and torch.equal(plain(q), want)
    assert torch.equal(q.to(torch.float64), want.double())


def test_transpose_and_slices_stay_in_low_precision():
    q = QuantizedOperand(_fp8_op())
    t = q.T
    assert isinstance(t, QuantizedOperand) and t.op.values.is_contiguous()  # the stored copy
    assert torch.equal(t + 0, (q + 0).T)
    s = q[:4, :7]
    assert isinstance(s, QuantizedOperand) and s.op.values.dtype == torch.float8_e4m3fn
    assert torch.equal(s + 0, (q + 0)[:4, :7]) and torch.equal(s.T + 0, (q + 0)[:4, :7].T)
    r = QuantizedOperand(_fp8_op(rowwise=True))
    assert isinstance(r[2:5], QuantizedOperand) and torch.equal(r[2:5] + 0, (r + 0)[2:5])
    assert not isinstance(r.T, QuantizedOperand)  # new scales would be needed: dequantized
    assert torch.equal(r.T, (r + 0).T)


def test_saved_for_backward_as_is():
    q = QuantizedOperand(_fp8_op())
    seen = []

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(q[:, :10])
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(ctx.saved_tensors[0])
            return g * 2

    F.apply(torch.ones(3, requires_grad=True)).sum().backward()
    assert isinstance(seen[0], QuantizedOperand) and seen[0].op is q.op


def test_plain_tensors_become_exact_operands():
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert operand_of(x).values.dtype == torch.float32
    assert operand_of(x.double()).values.dtype == torch.float64


def test_rowwise_with_its_column_wise_copy_transposes_to_the_copy():
    op = _fp8_op(rowwise=True)
    g = torch.Generator().manual_seed(1)
    codes_t = (torch.randn(10, 6, generator=g) * 20).to(torch.float8_e4m3fn)
    op = Operand(op.values, op.scale, values_t=codes_t, scale_t=torch.rand(10, 1, generator=g))
    t = QuantizedOperand(op).T
    assert isinstance(t, QuantizedOperand) and torch.equal(t + 0, codes_t.float() * op.scale_t)
    assert torch.equal(t.T + 0, QuantizedOperand(op) + 0)
    s = t[:, :4]  # a column slice of the copy keeps every column scale it uses
    assert torch.equal(s + 0, (t + 0)[:, :4])
