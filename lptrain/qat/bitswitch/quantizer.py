"""`DoubleRoundingQuantizer`: one learnable per-output-channel scale shared by every candidate
bit-width (algorithms.md §7.1). The bit-width is an argument of each call: the layer owns which
one is active (`BitSwitchLinear`)."""

from __future__ import annotations

import torch
from torch import nn

from lptrain.qat.bitswitch import double_rounding as dr
from lptrain.qat.quantizer import mark_quantizer_params

_MIN_STEP = 1e-8  # an all-zero row would give s = 0 and a division by zero


class DoubleRoundingQuantizer(nn.Module):
    """Weights (out, in) at any of `bits` (h = max(bits) is the storage bit-width).

    rounding: 'nearest' (round half to even, the paper) or 'shift' (floor, the ablation);
    scale_grad: 'corrected' (exact per-channel derivative) or 'faithful' (the reference's)."""

    def __init__(
        self,
        shape: tuple[int, int],
        bits: tuple[int, ...],
        *,
        rounding: str = "nearest",
        scale_grad: str = "corrected",
    ):
        super().__init__()
        if rounding not in dr.ROUNDINGS:
            raise ValueError(f"rounding: {rounding!r} is not one of {dr.ROUNDINGS}")
        if scale_grad not in dr.SCALE_GRADS:
            raise ValueError(f"scale_grad: {scale_grad!r} is not one of {dr.SCALE_GRADS}")
        self.bits = tuple(sorted(set(bits), reverse=True))
        self.h = self.bits[0]
        self.rounding, self.scale_grad = rounding, scale_grad
        self.shape = tuple(shape)
        # (out, 1), never (): DeepSpeed's broadcast views parameters as bytes; 0-dim fails.
        self.step = nn.Parameter(torch.ones(self.shape[0], 1))
        mark_quantizer_params(self.step)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """s_c = max(|μ_c - 3σ_c|, |μ_c + 3σ_c|) / 2^(h-1) per output row (§7.1: training
        starts at the highest bit-width). Call before DeepSpeed wraps the model."""
        ww = w.detach().to(dr.work_dtype(w))
        ww = torch.where(torch.isfinite(ww), ww, torch.zeros_like(ww))
        mu, sd = ww.mean(-1, keepdim=True), ww.std(-1, keepdim=True, correction=0)
        s = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** (self.h - 1)
        self.step.copy_(s.clamp_min(_MIN_STEP))

    def check(self, bits: int) -> int:
        if bits not in self.bits:
            raise ValueError(f"bits: {bits} is not a candidate bit-width {list(self.bits)}")
        return bits

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        return dr.double_round(
            w, self.step, self.check(bits), self.h,
            rounding=self.rounding, faithful=self.scale_grad == "faithful",
        )  # fmt: skip

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        """I_b as int8 (out, in)."""
        wd = dr.work_dtype(w)
        q = dr.codes(w.to(wd), self.step.to(wd), self.check(bits), self.h, self.rounding)
        return q.to(torch.int8)

    @torch.no_grad()
    def storage_codes(self, w: torch.Tensor) -> torch.Tensor:
        """I_h clamped to h bits, int8: the only weights a deployment keeps."""
        return dr.storage_codes(w, self.step, self.h)

    def dequantize_codes(self, q: torch.Tensor, bits: int) -> torch.Tensor:
        return dr.dequantize(q.to(self.step.dtype), self.step, self.h - self.check(bits))

    def extra_repr(self) -> str:
        return (
            f"double rounding, bits {list(self.bits)} (stored {self.h}), {self.rounding}, "
            f"per-channel scale, scale_grad={self.scale_grad}"
        )
