"""Shared helpers for the numerics tests: oracles and exact comparisons."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

# Our format name -> the ml_dtypes type with the same codes and values.
ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "e3m4": ml_dtypes.float8_e3m4,  # IEEE-like eXmY
    "e4m3": ml_dtypes.float8_e4m3,  # IEEE-like E4M3, max 240
}
# ml_dtypes saturates these (no NaN/Inf code); the others overflow to NaN/Inf.
ML_SATURATES = {"fp6_e3m2", "fp6_e2m3", "fp4_e2m1"}
MAXES = {
    "fp8_e4m3": 448.0,
    "fp8_e5m2": 57344.0,
    "fp6_e3m2": 28.0,
    "fp6_e2m3": 7.5,
    "fp4_e2m1": 6.0,
    "e3m4": 15.5,
    "e4m3": 240.0,
}


def ml_round(x: np.ndarray, name: str) -> np.ndarray:
    """ml_dtypes RNE cast of float32 values and back to float32."""
    return np.asarray(x, dtype=np.float32).astype(ML_DTYPES[name]).astype(np.float32)


def bits(t) -> np.ndarray:
    """int bit patterns of a float32/float64 array or tensor (NaNs canonicalised)."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    a = a.copy()
    a[np.isnan(a)] = np.nan
    return a.view(np.int32 if a.dtype == np.float32 else np.int64)


def assert_bits_equal(got, want) -> None:
    """Bit-for-bit equality (signed zeros distinguished, all NaNs equal)."""
    g, w = bits(got), bits(want)
    assert g.shape == w.shape, (g.shape, w.shape)
    bad = np.nonzero(g != w)[0] if g.ndim == 1 else np.argwhere(g != w)
    if len(bad):
        gv = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        wv = want.detach().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
        i = tuple(bad[0]) if g.ndim > 1 else bad[0]
        pytest.fail(f"{len(bad)} mismatches; first at {i}: got {gv[i]!r}, want {wv[i]!r}")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
