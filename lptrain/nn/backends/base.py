"""The backend interface: `Backend` (supports / quantize / gemm / after_step) and what a GEMM
returns. The package's __init__ chooses one; emulated.py, triton.py and te.py implement it."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple

import torch

from lptrain.errors import ConfigError
from lptrain.nn.shared import SharedInputs
from lptrain.numerics import QuantSpec

if TYPE_CHECKING:
    from lptrain.nn.call import CallContext
    from lptrain.nn.recipe import Recipe


class BackendError(ConfigError):
    """The `backend:` setting cannot be honoured here (a missing GPU or package, a recipe the
    backend refuses); the message says why and what to do. A ConfigError (and a ValueError):
    the trainer re-roots it under `precision.backend` and the CLI prints one line, exit 2."""

    def __init__(self, problem: str):
        super().__init__("backend", problem)


class GemmResult(NamedTuple):
    out: torch.Tensor  # C = A . B^T, float32 (float64 for float64 operands)
    qa: torch.Tensor | None  # the quantized operands as the GEMM saw them (padded, rotated)
    qb: torch.Tensor | None
    ma: torch.Tensor | None  # trust masks (|x . enc| below the format max), when asked for
    mb: torch.Tensor | None


class Backend(ABC):
    name: str
    # Layers reading one tensor share its quantized forward copy (nn/shared.py); bit-identical
    # either way, so off only to measure what sharing saves.
    share_inputs: bool = True

    @functools.cached_property
    def shared_inputs(self) -> SharedInputs:
        """The model's shared quantized inputs (one store per backend, i.e. per `convert`)."""
        return SharedInputs()

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

    def after_step(self) -> None:
        """Called after every optimizer step (the trainer's precision converter): drop whatever
        was cached for the old weights. Default: nothing is cached."""
        return None

    def __repr__(self) -> str:
        return self.name
