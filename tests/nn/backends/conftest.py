"""Backend tests run the Triton kernels natively on a GPU and under Triton's CPU interpreter
elsewhere; the interpreter is chosen before any kernel module is imported."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    """The interpreter's numpy warns about what kernels do on purpose (see tests/kernels)."""
    import numpy as np

    with np.errstate(all="ignore"):
        yield
