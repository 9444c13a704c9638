"""kernels/amax.py against lptrain.numerics.scaling.abs_max: tensor, rows, columns, strided
(transposed) operands, a fused Hadamard, non-finite groups (NaN, +Inf) with their flags, empty."""

from __future__ import annotations

import torch

from lptrain.kernels.amax import amax_2d
from lptrain.numerics import hadamard
from lptrain.numerics.scaling import abs_max

from .conftest import DEVICE, assert_same, randn


def test_tensor_rows_columns_of_a_strided_operand():
    x = randn(96, 200, seed=1, scale=2.0)
    for t in (x, x.T):  # a transposed view: the backward operands
        a = amax_2d(t, rows=True, cols=True)
        assert_same(a.tensor, abs_max(t))
        assert_same(a.rows, abs_max(t, (1,)))
        assert_same(a.cols, abs_max(t, (0,)))
        assert not bool(a.tensor_bad) and not bool(a.rows_bad.any())


def test_hadamard_rotates_before_the_max():
    x = randn(32, 128, seed=2)
    signs = (torch.arange(32) % 3 == 0).float().mul(2).sub(1).to(DEVICE)
    a = amax_2d(x, hadamard=32, signs=signs)
    assert_same(a.tensor, abs_max(hadamard(x, 32, signs=signs)))


def test_non_finite_groups_take_the_references_max():
    x = randn(40, 70, seed=3)
    x[5, 6] = float("inf")
    x[7, 1] = float("nan")
    a = amax_2d(x, rows=True, cols=True)
    assert_same(a.tensor, abs_max(x))  # NaN: the tensor holds one
    assert_same(a.rows, abs_max(x, (1,)))  # row 5: +Inf, row 7: NaN, the others finite
    assert_same(a.cols, abs_max(x, (0,)))
    assert bool(a.tensor_bad)
    assert a.rows_bad.flatten().nonzero().flatten().tolist() == [5, 7]
    assert a.cols_bad.flatten().nonzero().flatten().tolist() == [1, 6]
    x[7, 1] = -float("inf")
    assert_same(amax_2d(x).tensor, torch.tensor(float("inf"), device=DEVICE))


def test_empty():
    a = amax_2d(torch.empty(0, 64, device=DEVICE), rows=True, cols=True)
    assert float(a.tensor) == 0 and a.rows.shape == (0, 1) and a.cols.shape == (1, 64)
