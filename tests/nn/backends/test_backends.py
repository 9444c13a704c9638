"""Backend resolution (nn/backends/__init__.py): one choice per model, clear refusals."""

from __future__ import annotations

import pytest
from torch import nn

import lptrain
from lptrain.nn import Linear


@pytest.mark.parametrize("backend", ["te", "triton"])
def test_unavailable_backends_error_clearly(backend: str):
    with pytest.raises(ValueError, match=rf"backend '{backend}' is not available.*emulated"):
        lptrain.convert(nn.Sequential(nn.Linear(8, 8)), "fp8-current", backend=backend)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        Linear(8, 8, backend="cuda")
