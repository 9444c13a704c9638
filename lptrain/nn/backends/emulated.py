"""The emulated backend: fake-quantize both operands (lptrain.numerics, FP32 math), multiply in
FP32. Pure PyTorch on any device; the reference every other backend must match bit for bit.

INT32-accumulating GEMMs (`accumulate: int32`, the int16-dfp recipe) run the chunked INT16 x
INT16 -> INT32 emulation of numerics/dfp.py instead.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lptrain.nn.backends.base import Backend, GemmResult
from lptrain.nn.recipe import GEMMS
from lptrain.numerics import DFPTensor, QuantSpec, dfp_matmul, dfp_quantize, fake_quantize
from lptrain.numerics.scaling import abs_max
from lptrain.numerics.stats import compute_stats

if TYPE_CHECKING:
    from lptrain.nn.call import CallContext
    from lptrain.nn.recipe import GemmRecipe, Recipe


def _lcm(*ns: int) -> int:
    out = 1
    for n in ns:
        out = out * n // math.gcd(out, n)
    return out


def granularity(spec: QuantSpec | None) -> tuple[int, int]:
    """(row multiple, reduction multiple) an operand needs for its blocks and rotation."""
    if spec is None:
        return 1, 1
    red = spec.hadamard or 1
    rows = 1
    if spec.scaling == "block":
        if spec.tile is not None:
            rows, cols = spec.tile
            red = _lcm(red, cols)
        else:
            red = _lcm(red, spec.block_size)
    return rows, red


def pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pr = (-t.shape[0]) % rows
    pc = (-t.shape[1]) % cols
    return F.pad(t, (0, pc, 0, pr)) if pr or pc else t


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return t[:n] if t is not None else None  # crop the row padding


class EmulatedBackend(Backend):
    name = "emulated"

    def supports(self, recipe: "Recipe") -> str | None:
        return None  # the definition: every recipe

    def quantize(self, call, gemm, operand, t, spec, *, generator, signs, want_mask=False):
        if spec is None:
            return t if t.dtype == torch.float64 else t.float(), None
        state, update = call.state(gemm, operand)
        out = fake_quantize(
            t,
            spec,
            state=state,
            update=update,
            generator=generator,
            signs=signs,
            with_mask=want_mask,
            with_stats=call.collect,
            wanted=call.wanted,
        )
        if not (want_mask or call.collect):
            return out, None
        xq, extras = out
        if call.collect:
            call.record(gemm, operand, extras["stats"])
        return xq, extras.get("mask")

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
        """The reduction axis is zero-padded to the operands' block/rotation multiple (zeros add
        nothing to the GEMM and do not change amaxes; MX pads short blocks the same way)."""
        gr = call.recipe.gemm(gemm)
        if gr.accumulate == "int32":
            return GemmResult(
                self._dfp_gemm(call, gemm, gr, a, b, generator), None, None, None, None
            )
        op_a, op_b = GEMMS[gemm]
        ra, ka = granularity(gr.a)
        rb, kb = granularity(gr.b)
        k = _lcm(ka, kb)
        pa, pb = pad_to(a, ra, k), pad_to(b, rb, k)
        spec_a = None if quantized[0] else gr.a
        spec_b = None if quantized[1] else gr.b
        kw = dict(generator=generator, signs=signs, want_mask=want_mask)
        qa, ma = self.quantize(call, gemm, op_a, pa, spec_a, **kw)
        qb, mb = self.quantize(call, gemm, op_b, pb, spec_b, **kw)
        if qa.dtype != qb.dtype:  # a float64 layer: keep float64 through reused copies
            qa, qb = qa.double(), qb.double()
        c = qa @ qb.T
        m, n = a.shape[0], b.shape[0]
        return GemmResult(c[:m, :n], _rows(qa, m), _rows(qb, n), _rows(ma, m), _rows(mb, n))

    def _dfp_gemm(
        self, call: "CallContext", gemm: str, gr: "GemmRecipe", a, b, generator
    ) -> torch.Tensor:
        """DFP operands (one exponent per tensor, from the finite elements), INT32 chunks.

        DFP has no code for NaN/Inf: the GEMM runs on the finite values and the outputs whose
        reduction touches a non-finite element are NaN, the rows and columns FP32 would spoil.
        """
        # The operands' amax (which the quantizer needs anyway) is finite unless an element is
        # not: the element-wise isfinite passes run only then.
        amax_a, amax_b = (
            abs_max(a).float(),
            abs_max(b).float(),
        )  # = of a.float(): rounding is monotone
        spoiled = not bool(torch.isfinite(amax_a) & torch.isfinite(amax_b))
        if spoiled:
            bad_a, bad_b = ~torch.isfinite(a).all(-1), ~torch.isfinite(b).all(-1)
            a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
            b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
            amax_a = amax_b = None
        op_a, op_b = GEMMS[gemm]
        da = self._dfp(call, gemm, op_a, a, gr.a, generator, amax_a)
        db = self._dfp(call, gemm, op_b, b, gr.b, generator, amax_b)
        res = dfp_matmul(da, db, chunk=gr.chunk, overflow=gr.overflow)
        call.count_overflows(gemm, res.overflows)
        if call.collect:
            call.record(
                gemm,
                "accumulator",
                {"int32_overflows": float(res.overflows), "chunk_sums": float(res.chunks)},
            )
        out = res.out
        if spoiled:
            nan = torch.full_like(out, float("nan"))
            out = torch.where(bad_a[:, None] | bad_b[None, :], nan, out)
        return out

    @staticmethod
    def _dfp(call: "CallContext", gemm: str, op: str, t, spec, generator, amax) -> DFPTensor:
        bits, rounding = spec.fmt.bits, spec.rounding
        d = dfp_quantize(t, bits=bits, rounding=rounding, generator=generator, amax=amax)
        if call.collect:
            scaled = torch.ldexp(t.float(), -d.exponent)
            m = d.mantissa.float()
            stats = compute_stats(t, scaled, m, d.dequantize(), None, None, spec, call.wanted)
            call.record(gemm, op, stats)
        return d
