"""`LSQQuantizer`: learnable step (and LSQ+ offset) for one weight or one activation input.

Weights are initialised from the weight when the quantizer is built (before DeepSpeed: an
in-place edit after `deepspeed.initialize` would be undone by the fp32 master copy).
Activation quantizers are initialised from a batch: `lptrain.qat.calibrate(model, batch)`
(the trainer does this before DeepSpeed wraps the model) or, failing that, the first training
forward. Inits (§5): LSQ `s = 2·mean|v|/√p`; LSQ+ weights `s = max(|μ-3σ|, |μ+3σ|)/2^(b-1)`,
β = 0; LSQ+ activations min/max `s = (max - min)/(p - n)`, `β = min - n·s`.
"""

from __future__ import annotations

import torch
from torch import nn

from lptrain.qat.lsq import (
    GRANULARITIES,
    bounds,
    dequantize,
    grad_scale,
    lsq_fake_quantize,
    work_dtype,
)

QUANTIZER_ROLE = "quantizer"  # `param.lptrain_role`: the optimizer groups quantizer parameters
_MIN_STEP = 1e-8  # an all-zero group would give s = 0 and a division by zero


def mark_quantizer_params(*params: nn.Parameter | None) -> None:
    """Tag step/offset parameters: `engine.param_groups` puts them in their own group, without
    weight decay (issue 13's ALRS scales that group's learning rate)."""
    for p in params:
        if p is not None:
            p.lptrain_role = QUANTIZER_ROLE


def is_quantizer_param(p: torch.Tensor) -> bool:
    return getattr(p, "lptrain_role", None) == QUANTIZER_ROLE


def step_shape(granularity: str, shape: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    """The step's shape for a weight of `shape` (out, in): it broadcasts over the grouped view."""
    if granularity == "tensor":
        return (1,)  # not (): DeepSpeed's broadcast views parameters as bytes, 0-dim fails
    out, inp = shape
    if granularity == "channel":
        return (out, 1)
    return (out, inp // group_size, 1)


class LSQQuantizer(nn.Module):
    """LSQ (offset=False) or LSQ+ (offset=True) fake quantizer of `bits` bits.

    role: 'weight' (a 2-D (out, in) tensor, any granularity) or 'input' (activations,
    per-tensor). Parameters: `step` and, for LSQ+, `offset`; buffer `initialized`.
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: bool = True,
        granularity: str = "tensor",
        group_size: int = 128,
        offset: bool = False,
        role: str = "weight",
        shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits: must be in 2..8, got {bits}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: {granularity!r} is not one of {GRANULARITIES}")
        if role == "input" and granularity != "tensor":
            raise ValueError("granularity: activation quantizers are per-tensor")
        if granularity != "tensor" and (shape is None or len(shape) != 2):
            raise ValueError(f"granularity {granularity!r} needs the weight's (out, in) shape")
        if granularity == "group" and (group_size < 1 or shape[1] % group_size):
            raise ValueError(
                f"group_size: {group_size} does not divide in_features {shape[1]} of a "
                f"{tuple(shape)} weight"
            )
        self.bits, self.signed, self.granularity = bits, signed, granularity
        self.group_size, self.role = group_size, role
        self.shape = tuple(shape) if shape is not None else None
        self.n, self.p = bounds(bits, signed)
        sshape = step_shape(granularity, self.shape, group_size) if shape is not None else (1,)
        self.step = nn.Parameter(torch.ones(sshape))
        self.offset = nn.Parameter(torch.zeros(sshape)) if offset else None
        mark_quantizer_params(self.step, self.offset)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # -- grouping ------------------------------------------------------------------------

    def grouped(self, v: torch.Tensor) -> torch.Tensor:
        if self.granularity == "group":
            out, inp = v.shape
            return v.reshape(out, inp // self.group_size, self.group_size)
        return v

    def elements_per_step(self, v: torch.Tensor) -> int:
        if self.role == "input":
            return v.shape[-1] if v.dim() else 1  # features, not numel (lsq.py docstring)
        if self.granularity == "tensor":
            return v.numel()
        return v.shape[-1] if self.granularity == "channel" else self.group_size

    # -- init ----------------------------------------------------------------------------

    @torch.no_grad()
    def init_from(self, v: torch.Tensor) -> None:
        """Set step (and offset) from a tensor, per the documented inits; marks initialized."""
        if v.numel() == 0:
            return
        vg = self.grouped(v.detach().to(work_dtype(v)))
        vg = torch.where(torch.isfinite(vg), vg, torch.zeros_like(vg))
        dims = self._reduce_dims(vg)
        if self.offset is None:  # LSQ
            s = 2 * vg.abs().mean(dims, keepdim=True) / self.p**0.5
            b = None
        elif self.role == "weight":  # LSQ+ weights: ±3σ, β = 0
            mu, sd = vg.mean(dims, keepdim=True), vg.std(dims, keepdim=True, correction=0)
            s = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** (self.bits - 1)
            b = torch.zeros_like(s)
        else:  # LSQ+ activations: min/max
            lo, hi = vg.amin(dims, keepdim=True), vg.amax(dims, keepdim=True)
            s = (hi - lo) / (self.p - self.n)
            s = s.clamp_min(_MIN_STEP)
            b = lo - self.n * s
        self.step.copy_(s.clamp_min(_MIN_STEP).reshape(self.step.shape))
        if b is not None:
            self.offset.copy_(b.reshape(self.offset.shape))
        self.initialized.fill_(True)

    def _reduce_dims(self, vg: torch.Tensor) -> tuple[int, ...]:
        if self.granularity == "tensor":
            return tuple(range(vg.dim()))
        return (-1,)

    # -- forward / export ----------------------------------------------------------------

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        g = grad_scale(self.elements_per_step(v), self.p)
        out = lsq_fake_quantize(self.grouped(v), self.step, self.offset, self.n, self.p, g)
        return out.reshape(v.shape)

    @torch.no_grad()
    def integer_codes(self, v: torch.Tensor) -> torch.Tensor:
        """round(clamp((v - β)/s)) as int8, in `v`'s (ungrouped) shape: what an export stores."""
        vg = self.grouped(v.to(work_dtype(v)))
        s = self.step.to(vg.dtype)
        u = vg / s if self.offset is None else (vg - self.offset.to(vg.dtype)) / s
        return torch.round(u.clamp(self.n, self.p)).to(torch.int8).reshape(v.shape)

    def dequantize_codes(self, q: torch.Tensor) -> torch.Tensor:
        qg = self.grouped(q.to(self.step.dtype))
        return dequantize(qg, self.step, self.offset).reshape(q.shape)

    def extra_repr(self) -> str:
        kind = "lsq+" if self.offset is not None else "lsq"
        sign = "signed" if self.signed else "unsigned"
        gran = f"group {self.group_size}" if self.granularity == "group" else self.granularity
        return f"{kind}, {self.bits} bits {sign}, {gran}, role={self.role}"
