"""kernels/_core.py, element by element: rounding and codes against round_to_format / encode on
every code, ties, overflow, subnormals, signed zeros and NaN; exponent helpers against frexp;
the in-register Hadamard butterfly against lptrain.numerics.hadamard."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from lptrain.kernels import _core as K
from lptrain.kernels.reference import philox_bits, round_with_bits
from lptrain.numerics import decode_table, encode, get_format, hadamard, round_to_format

from .conftest import DEVICE, assert_same


@triton.jit
def _round_encode(x_ptr, r_ptr, c_ptr, n, seed, BLOCK: tl.constexpr, STOCH: tl.constexpr,
                  EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
                  EMIN: tl.constexpr, MAXF: tl.constexpr, MIN_NORMAL: tl.constexpr,
                  IS_INT: tl.constexpr, HAS_INF: tl.constexpr, NAN_KIND: tl.constexpr,
                  TORCH_FP8: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    rb = tl.randint(seed, offs.to(tl.int64))
    r = K.round_grid(x, rb, STOCH, MBITS, EMIN, MAXF, MIN_NORMAL, IS_INT)
    tl.store(r_ptr + offs, r, mask=m)
    c = K.encode_grid(r, EBITS, MBITS, BIAS, EMIN, MIN_NORMAL, IS_INT, HAS_INF, NAN_KIND, TORCH_FP8)
    tl.store(c_ptr + offs, c, mask=m)


def _edge_values(name: str) -> torch.Tensor:
    fmt = get_format(name)
    if fmt.is_int:
        grid = torch.arange(-fmt.max_finite, fmt.max_finite + 1)
    else:
        t = decode_table(fmt)
        grid = t[torch.isfinite(t)]
    pos = grid[grid > 0].sort().values
    mids = (pos[1:] + pos[:-1]) / 2  # ties: RNE goes to the even code
    vals = [grid, mids, -mids, pos[:1] / 2, pos[:1] / 4, mids * (1 + 2**-20)]
    big = torch.tensor([fmt.max_finite * 1.01, fmt.max_finite * 4, 1e30, float("inf")])
    misc = torch.tensor([0.0, -0.0, float("nan"), 1e-40, -1e-45])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(2000, generator=g) * fmt.max_finite / 4
    out = torch.cat([*vals, big, -big, misc, rand]).float()
    return out.abs() if not fmt.signed else out


def _run(x: torch.Tensor, name: str, stochastic: bool, seed: int = 5):
    n = x.numel()
    xd = x.to(DEVICE)
    r = torch.empty(n, device=DEVICE)
    c = torch.empty(n, dtype=torch.int32, device=DEVICE)
    _round_encode[(triton.cdiv(n, 1024),)](xd, r, c, n, seed, BLOCK=1024, STOCH=stochastic,
                                           **K.fmt_args(name))  # fmt: skip
    return r.cpu(), c.cpu().to(torch.int64)


FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int16", "ue4m3",
           "ue5m3", "e3m4"]  # fmt: skip


@pytest.mark.parametrize("name", FORMATS)
def test_rne_and_codes_match_the_reference(name: str):
    fmt = get_format(name)
    x = _edge_values(name)
    r, codes = _run(x, name, stochastic=False)
    want = round_to_format(x, fmt)
    assert_same(r, want, f"{name} values")
    if fmt.torch_dtype is not None and fmt.torch_dtype.is_floating_point:
        want_codes = want.to(fmt.torch_dtype).view(torch.uint8).to(torch.int64)
    else:
        want_codes = encode(want, fmt)
    mask = (1 << fmt.bits) - 1
    finite = ~want.isnan() | (fmt.nan != "none")  # formats without NaN have no NaN code
    assert torch.equal((codes & mask)[finite], (want_codes & mask)[finite]), name


@pytest.mark.parametrize("name", FORMATS)
def test_stochastic_equals_the_bits_reference(name: str):
    x = _edge_values(name)
    r, _ = _run(x, name, stochastic=True, seed=2**40 + 3)
    assert_same(r, round_with_bits(x, name, philox_bits(2**40 + 3, torch.arange(x.numel()))))


@triton.jit
def _exp_helpers(e_ptr, p_ptr, a_ptr, fl_ptr, p2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(p_ptr + offs, K.exp2i(tl.load(e_ptr + offs, mask=m, other=0)), mask=m)
    fl, p2 = K.log2_parts(tl.load(a_ptr + offs, mask=m, other=1.0))
    tl.store(fl_ptr + offs, fl, mask=m)
    tl.store(p2_ptr + offs, p2.to(tl.int32), mask=m)


def test_exponent_helpers_are_exact():
    e = torch.arange(-149, 128, dtype=torch.int32)
    a = torch.cat(
        [torch.ldexp(torch.ones(277), e.float()), torch.tensor([3.0, 1e-40, 7e-45, 448.1])]
    )
    n = max(e.numel(), a.numel())
    e = torch.cat([e, torch.zeros(n - e.numel(), dtype=torch.int32)]).to(DEVICE)
    p = torch.empty(n, device=DEVICE)
    fl = torch.empty(n, dtype=torch.int32, device=DEVICE)
    p2 = torch.empty(n, dtype=torch.int32, device=DEVICE)
    _exp_helpers[(1,)](e, p, a.to(DEVICE), fl, p2, n, BLOCK=512)
    assert_same(p.cpu(), torch.ldexp(torch.ones(n), e.cpu()))
    m, ex = torch.frexp(a)
    assert torch.equal(fl.cpu(), (ex - 1).to(torch.int32))
    assert torch.equal(p2.cpu().bool(), m == 0.5)


@triton.jit
def _had(x_ptr, s_ptr, y_ptr, BR: tl.constexpr, BC: tl.constexpr, LOG2N: tl.constexpr,
         SCALE: tl.constexpr, SIGNS: tl.constexpr):  # fmt: skip
    offs = tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :]
    y = K.hadamard_rows(tl.load(x_ptr + offs), s_ptr, BR, BC, LOG2N, SCALE, SIGNS)
    tl.store(y_ptr + offs, y)


@pytest.mark.parametrize("n", [16, 32, 128])
@pytest.mark.parametrize("with_signs", [False, True])
def test_hadamard_butterfly_is_the_reference(n: int, with_signs: bool):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(8, 256, generator=g) * 5
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float() if with_signs else None
    y = torch.empty(8, 256, device=DEVICE)
    s = signs.to(DEVICE) if with_signs else y
    _had[(1,)](x.to(DEVICE), s, y, BR=8, BC=256, LOG2N=int(math.log2(n)),
               SCALE=1.0 / math.sqrt(n), SIGNS=with_signs)  # fmt: skip
    assert_same(y.cpu(), hadamard(x, n, signs=signs))
