"""A GEMM operand in low precision, and the tensor that carries it through autograd.

`Operand` holds what a fast GEMM consumes: FP8 codes with a per-tensor or per-row decode scale,
or dense values the scales are already folded into (block formats, dequantized exactly into
BF16 where the products fit), or INT16 DFP mantissas with their exponent; plus, for tensorwise
FP8, the transposed codes the other backward GEMM reads (written in the same kernel pass).

`QuantizedOperand` is a torch.Tensor subclass that *is* the fake-quantized FP32 tensor for
anyone who looks (any op dequantizes it first, bit-identical to the emulated backend's value),
while the Linear's autograd Function saves it, slices it and transposes it without
dequantizing: those three ops stay in low precision. So the backward GEMMs get codes, not FP32
copies, with no change to the Function, `save_for_backward` or activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils._pytree import tree_map

aten = torch.ops.aten
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Operand:
    values: torch.Tensor  # (R, C): FP8 codes, dense values (BF16/FP32) or DFP int16 mantissas
    scale: torch.Tensor | None = None  # decode scale left out of `values`: 0-d or (R, 1)
    gscale: torch.Tensor | None = None  # two-level tensor decode scale S_dec (0-d)
    values_t: torch.Tensor | None = None  # (C, R): the transposed copy's codes
    scale_t: torch.Tensor | None = None  # its (C, 1) scales when it has its own (rowwise)
    exponent: torch.Tensor | None = None  # DFP shared exponent: values are int mantissas

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def is_fp8(self) -> bool:
        return self.values.dtype in FP8

    @property
    def rowwise(self) -> bool:
        return self.scale is not None and self.scale.dim() == 2

    def dequantize(self) -> torch.Tensor:
        """FP32 values, in the emulated backend's operation order (codes . dec, then S_dec)."""
        if self.exponent is not None:
            return torch.ldexp(self.values.to(torch.float32), self.exponent)
        v = self.values.to(torch.float32)
        if self.scale is not None:
            v = v * self.scale
        return v * self.gscale if self.gscale is not None else v

    def t(self) -> "Operand | None":
        """The transposed operand, or None when it would need new scales (rowwise scaling
        without the column-wise copy). Rowwise with its copy: the copy, quantized row-wise."""
        if self.rowwise:
            if self.values_t is None:
                return None
            return replace(self, values=self.values_t, scale=self.scale_t,
                           values_t=self.values, scale_t=self.scale)  # fmt: skip
        if self.values_t is not None:
            return replace(self, values=self.values_t, values_t=self.values)
        return replace(self, values=self.values.t())

    def narrow(self, dim: int, start: int, end: int) -> "Operand | None":
        n = self.values.shape[dim]
        start, end = max(0, min(start, n)), max(0, min(end, n))
        if (start, end) == (0, n):
            return self
        vt = self.values_t
        scale, scale_t = self.scale, self.scale_t
        if self.rowwise and dim == 0:
            scale = scale[start:end]
        if scale_t is not None and dim == 1:
            scale_t = scale_t[start:end]
        return replace(
            self,
            values=self.values.narrow(dim, start, end - start),
            scale=scale,
            values_t=vt.narrow(1 - dim, start, end - start) if vt is not None else None,
            scale_t=scale_t,
        )


class QuantizedOperand(torch.Tensor):
    """The fake-quantized FP32 view of an `Operand` (see the module docstring)."""

    op: Operand

    @staticmethod
    def __new__(cls, op: Operand):
        return torch.Tensor._make_wrapper_subclass(
            cls, op.values.shape, dtype=torch.float32, device=op.values.device
        )

    def __init__(self, op: Operand):
        self.op = op

    def __repr__(self) -> str:
        return f"QuantizedOperand({tuple(self.shape)}, values={self.op.values.dtype})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return cls(self.op)
        if _is_transpose(func, args):
            t = self.op.t()
            if t is not None:
                return cls(t)
        if func is aten.slice.Tensor and _step(args) == 1:
            dim = args[1] if len(args) > 1 else 0
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else self.shape[dim]
            s = self.op.narrow(dim % 2, start, end)
            if s is not None:
                return cls(s)
        plain = tree_map(lambda a: a.op.dequantize() if isinstance(a, cls) else a, (args, kwargs))
        return func(*plain[0], **plain[1])


def _is_transpose(func, args) -> bool:
    if func is aten.t.default:
        return True
    if func is aten.transpose.int:
        return sorted(d % 2 for d in args[1:3]) == [0, 1]
    return func is aten.permute.default and [d % 2 for d in args[1]] == [1, 0]


def _step(args) -> int:
    return args[4] if len(args) > 4 else 1


def operand_of(t: torch.Tensor) -> Operand:
    """The Operand inside a QuantizedOperand, or a plain tensor's values as an exact operand."""
    if isinstance(t, QuantizedOperand):
        return t.op
    return Operand(values=t if t.dtype == torch.float64 else t.to(torch.float32))


def plain(t: torch.Tensor) -> torch.Tensor:
    """A regular tensor (dequantized when it carries an Operand)."""
    return t.op.dequantize() if isinstance(t, QuantizedOperand) else t
