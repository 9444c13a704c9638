"""Block-diagonal Walsh-Hadamard transform (algorithms.md §3.1-3.3, §3.8)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from lptrain.numerics import TE_NVFP4_SIGNS, hadamard, hadamard_matrix, random_signs

NS = [16, 32, 64, 128]


def _g(s):
    return torch.Generator().manual_seed(s)


@pytest.mark.parametrize("n", NS)
def test_matrix_and_fwht_equal_scipy_per_block(n):
    ref = torch.from_numpy(scipy.linalg.hadamard(n) / math.sqrt(n))
    assert torch.equal(hadamard_matrix(n, dtype=torch.float64), ref)
    H = hadamard_matrix(n, dtype=torch.float64)
    assert torch.equal(H, H.T) and torch.allclose(
        H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-14
    )
    x = torch.randn(3, 5 * n, generator=_g(n), dtype=torch.float64)
    y = hadamard(x, n)
    want = (x.reshape(3, 5, n) @ ref).reshape(3, 5 * n)  # every block times H_n / sqrt(n)
    assert torch.allclose(y, want, rtol=0, atol=1e-12)
    x32 = x.float()
    assert torch.allclose(hadamard(x32, n), want.float(), rtol=0, atol=1e-5)
    # another dim
    z = torch.randn(2 * n, 7, generator=_g(1), dtype=torch.float64)
    assert torch.allclose(hadamard(z, n, dim=0), hadamard(z.T.contiguous(), n).T, atol=0)


@pytest.mark.parametrize("n", NS)
def test_involution_and_norm(n):
    x = torch.randn(8, 4 * n, generator=_g(2), dtype=torch.float64)
    y = hadamard(x, n)
    assert torch.allclose(hadamard(y, n), x, rtol=0, atol=1e-12)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-14)
    assert torch.allclose(
        y.reshape(8, 4, n).norm(dim=2), x.reshape(8, 4, n).norm(dim=2), rtol=1e-14
    )  # per block
    s = random_signs(
        n,
        _g(3),
    )
    ys = hadamard(x, n, signs=s)
    assert torch.allclose(hadamard(ys, n, signs=s, inverse=True), x, rtol=0, atol=1e-12)
    assert torch.allclose(ys.norm(dim=1), x.norm(dim=1), rtol=1e-14)
    assert set(s.tolist()) == {1.0, -1.0}


def test_reference_values():
    assert hadamard(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4).tolist() == [5.0, -1.0, -2.0, 0.0]
    assert hadamard(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4).tolist() == [0.5] * 4
    e0 = torch.zeros(32)
    e0[0] = 100.0
    assert torch.allclose(hadamard(e0, 32), torch.full((32,), 100 / math.sqrt(32)), rtol=1e-6)
    assert len(TE_NVFP4_SIGNS) == 16


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kind", ["H", "DH", "HD"])
def test_gemm_identity(n, kind):
    g = _g(n)
    X = torch.randn(64, 2 * n, generator=g)
    W = torch.randn(48, 2 * n, generator=g)
    s = random_signs(n, g)
    if kind == "H":
        Xm, Wm = hadamard(X, n), hadamard(W, n)
    elif kind == "DH":  # M = D . H: signs first
        Xm, Wm = hadamard(X, n, signs=s), hadamard(W, n, signs=s)
    else:  # M = H . D (Quartet): signs after
        Xm, Wm = hadamard(X, n) * s.repeat(2), hadamard(W, n) * s.repeat(2)
    got = Xm @ Wm.T
    want = X.double() @ W.double().T
    ref = X @ W.T
    err = (got.double() - want).abs().max().item()
    scale = (X.double().abs() @ W.double().abs().T).max().item()
    # fp32 rounding: a few ulps of the |X||W| magnitude, same order as the plain fp32 GEMM
    assert err <= 8 * 2.0**-24 * scale * math.log2(2 * n)
    assert err <= 10 * max((ref.double() - want).abs().max().item(), 2.0**-24 * scale)


def test_bad_block_sizes():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(torch.zeros(4, 24), 24)
    with pytest.raises(ValueError, match="does not divide"):
        hadamard(torch.zeros(4, 48), 32)
    with pytest.raises(ValueError, match="signs"):
        hadamard(torch.zeros(4, 32), 32, signs=torch.ones(16))


def _butterfly_definition(x: torch.Tensor, n: int, signs=None) -> torch.Tensor:
    """algorithms.md §3.1 written out along the last dim: (x . signs), then for h = 1, 2, ...
    each pair (a, b) at distance h becomes (a + b, a - b), then x 1/sqrt(n)."""
    y = x.reshape(-1, n) * (signs if signs is not None else 1.0)
    h = 1
    while h < n:
        v = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), 2).reshape(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)


@pytest.mark.parametrize("n", [2, 16, 32, 128])
def test_every_memory_layout_gives_the_definitions_bits(n):
    """A transposed operand (the chunks' axis outer in memory, as the backward GEMMs hand it
    over) runs the butterfly in its own memory order; every element must still see the same
    additions: bits equal to the definition, with signs, inverse, and NaN/Inf/-0 elements."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(256, 96, generator=g)
    x[3, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    signs = random_signs(n, g)
    for view in (x.T, x.T.contiguous(), x.reshape(2, 128, 96).transpose(1, 2)):
        want = _butterfly_definition(view.contiguous(), n, signs)
        got = hadamard(view, n, signs=signs)
        assert got.shape == view.shape
        assert torch.equal(got.contiguous().view(torch.int32), want.view(torch.int32))
        back = hadamard(got, n, signs=signs, inverse=True)
        want_back = (_butterfly_definition(got.contiguous(), n).reshape(-1, n) * signs).reshape(
            view.shape
        )
        assert torch.equal(back.contiguous().view(torch.int32), want_back.view(torch.int32))
    assert hadamard(torch.empty(0, n), n, signs=signs).shape == (0, n)
    assert hadamard(torch.empty(n, 0).T, n, dim=1).shape == (0, n)
