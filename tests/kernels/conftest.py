"""Kernel tests: natively on a GPU, under Triton's CPU interpreter elsewhere (CI). The
interpreter is chosen before any kernel module is imported (Triton decides at decoration)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-for-bit equality of float tensors (signed zeros distinguished, NaNs all equal)."""
    if got.shape != want.shape:
        return False
    g, w = got.float().cpu(), want.float().cpu()
    return bool(((g.view(torch.int32) == w.view(torch.int32)) | (g.isnan() & w.isnan())).all())


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        got = got.view(torch.uint8)
    if want.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        want = want.view(torch.uint8)
    if got.is_floating_point() or want.is_floating_point():
        ok = same_bits(got, want)
    else:
        ok = torch.equal(got.cpu().to(torch.int64), want.cpu().to(torch.int64))
    if not ok:
        g, w = got.float().cpu().flatten(), want.float().cpu().flatten()
        bad = (~((g == w) | (g.isnan() & w.isnan()))).nonzero().flatten()
        i = int(bad[0]) if len(bad) else 0
        pytest.fail(f"{what}: {len(bad)} mismatches; first at flat index {i}: {g[i]} vs {w[i]}")


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    """The interpreter runs kernels in numpy, which warns about what the kernels do on purpose
    (NaN through integer casts in discarded branches, Inf - Inf in non-finite tests)."""
    import numpy as np

    with np.errstate(all="ignore"):
        yield
