"""Backends: what runs a Linear's quantizers and GEMMs. Chosen once per model (style principle 2).

A backend does three things: `supports(recipe)` says whether it runs a recipe exactly (None) or
why not (a sentence); `quantize` fake-quantizes one operand; `gemm` runs one of the three GEMMs,
C = A . B^T with both operands quantized along their last axis. The emulated backend
(`emulated.py`, pure PyTorch, any device) is the definition every other backend must match.

`resolve(name, recipe)` turns the `backend:` setting into a backend and the reason it was
chosen; `lptrain.convert` calls it once per model and logs the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple

import torch

from lptrain.numerics import QuantSpec

if TYPE_CHECKING:
    from lptrain.nn.call import CallContext
    from lptrain.nn.recipe import Recipe

BACKENDS = ("auto", "emulated", "triton", "te")


class GemmResult(NamedTuple):
    out: torch.Tensor  # C = A . B^T, float32 (float64 for float64 operands)
    qa: torch.Tensor | None  # the quantized operands as the GEMM saw them (padded, rotated)
    qb: torch.Tensor | None
    ma: torch.Tensor | None  # trust masks (|x . enc| below the format max), when asked for
    mb: torch.Tensor | None


class Backend(ABC):
    name: str

    @abstractmethod
    def supports(self, recipe: "Recipe") -> str | None:
        """None when this backend runs `recipe` exactly, else the reason it cannot."""

    @abstractmethod
    def quantize(
        self,
        call: "CallContext",
        gemm: str,
        operand: str,
        t: torch.Tensor,
        spec: QuantSpec,
        *,
        generator: torch.Generator,
        signs: torch.Tensor | None,
        want_mask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fake-quantized t, trust mask or None) for one operand of one GEMM."""

    @abstractmethod
    def gemm(
        self,
        call: "CallContext",
        gemm: str,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        generator: torch.Generator,
        signs: torch.Tensor | None,
        want_mask: bool = False,
        quantized: tuple[bool, bool] = (False, False),
    ) -> GemmResult:
        """C = A . B^T for `gemm`, operands quantized per the recipe along their last axis.
        `quantized` marks operands that already are (a reused copy)."""

    def __repr__(self) -> str:
        return self.name


def resolve(name: str, recipe: "Recipe") -> tuple[Backend, str]:
    """(backend, reason) for the `backend:` setting and a recipe; ValueError if impossible."""
    from lptrain.nn.backends.emulated import EmulatedBackend

    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name in ("triton", "te"):
        raise ValueError(
            f"backend {name!r} is not available in this release: only the emulated backend "
            f"ships (use backend 'auto' or 'emulated'; the GPU backends come behind the same "
            f"recipes)"
        )
    backend = EmulatedBackend()
    why_not = backend.supports(recipe)
    if why_not:
        raise ValueError(f"backend {backend.name!r} cannot run recipe {recipe.name!r}: {why_not}")
    if name == "auto":
        return backend, "auto: emulated (the reference backend; no GPU backend in this release)"
    return backend, "emulated (requested)"


__all__ = ["BACKENDS", "Backend", "GemmResult", "resolve"]
