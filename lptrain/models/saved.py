"""FP8 saved activations outside the GEMMs (`precision.saved_activations: fp8`).

Autograd keeps the inputs of RMSNorm, SwiGLU and attention until backward, in the activation
dtype (RMSNorm even in fp32: it normalises an fp32 copy). With this option each of those ops
runs as `keep_fp8(fn, ...)`: the forward computes `fn` on the exact inputs (its output is the
unquantized path's bit for bit), and saves only FP8 E4M3 copies of the activation inputs; the
backward dequantizes them and differentiates `fn` again on the copies (a recompute, as
activation checkpointing does for a whole block). For attention that means q, k and v are kept
in FP8 and SDPA runs once more in backward; its output is not kept at all (the following
Linear keeps its own, possibly quantized, copy).

Granularity (COAT's per-group activations, arXiv:2410.19313 §5): one FP32 scale per group of
`block` consecutive elements along the last dim, `block = gcd(last dim, 128)` (128 for the 7B
model's widths and head dims; 32 for a head dim of 32); a last dim with no power-of-two factor
of at least 16 gets one scale per row. Scales are FP32 `amax / 448`, not rounded to a power of
two: at the same 4 bytes per group they keep 4-9 dB more gradient SQNR on inputs with a wide
channel range (algorithms.md §11; tests/models/test_saved.py checks each op's bound). The
quantizer is lptrain.numerics' `quantize` (E4M3FN, round to nearest, saturating; a non-finite
element becomes NaN, so its gradient stays non-finite). Weights are saved as they are (they
are parameters, model state, not activations).

Nothing is saved and nothing is quantized when no gradient is being recorded (no_grad,
inference), and the ops hold no state: under activation checkpointing the recomputed forward
quantizes the same values to the same codes. On `meta` (lptrain plan's measurement) the
copies are allocated with the real path's shapes and dtypes, without values.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from lptrain.numerics import QuantizedTensor, QuantSpec, quantize

MODES = ("none", "fp8")
GROUP = 128  # the widest group: COAT's and DeepSeek-V3's 1 x 128


@functools.lru_cache(maxsize=None)  # per op per forward: build (and validate) each spec once
def group_spec(last_dim: int) -> QuantSpec:
    """The E4M3 spec for tensors whose last dim is `last_dim` (see the module docstring)."""
    block = math.gcd(last_dim, GROUP)
    if block < 16:  # a per-element-ish scale would cost more than the codes
        return QuantSpec("fp8_e4m3", scaling="row")
    return QuantSpec("fp8_e4m3", scaling="block", block_size=block)


def _pack(x: torch.Tensor) -> tuple[QuantizedTensor, list[torch.Tensor]]:
    """(x quantized with its tensors taken out, the tensors to save: codes and scales). Only
    autograd's saved tensors hold them, so saved-tensor hooks see them: activation
    checkpointing drops them, `lptrain plan` counts them."""
    spec = group_spec(x.shape[-1])
    q = _meta_quantized(x, spec) if x.device.type == "meta" else quantize(x, spec)
    tensors = [q.codes] + ([q.scales] if q.scales is not None else [])
    q.codes, q.scales = None, None
    return q, tensors


def _meta_quantized(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """What `quantize(x, spec)` returns, as shapes only: quantize reads values (amaxes)."""
    n = x.shape[-1]
    grouped = (*x.shape[:-1], n // spec.block_size, spec.block_size) if spec.block_size else x.shape
    return QuantizedTensor(
        codes=torch.empty(grouped, dtype=torch.float8_e4m3fn, device="meta"),
        scales=torch.empty((*grouped[:-1], 1), dtype=torch.float32, device="meta"),
        global_scale=None, spec=spec, shape=x.shape, grouped_shape=torch.Size(grouped),
        moved_shape=x.shape, packed=False,
    )  # fmt: skip


def _unpack(q: QuantizedTensor, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    q.codes, q.scales = tensors[0], tensors[1] if len(tensors) > 1 else None
    try:
        return q.dequantize().to(dtype)
    finally:
        q.codes, q.scales = None, None  # autograd's saved tensors stay the only holders


class _KeepFP8(torch.autograd.Function):
    """y = fn(*tensors); the activations among `tensors` saved in FP8, the rest as they are."""

    @staticmethod
    def forward(ctx, fn, quantized: tuple[bool, ...], *tensors):
        y = fn(*tensors)  # grad is off inside forward: the same ops as the plain path
        ctx.fn, ctx.layout, saved = fn, [], []  # layout: (pack or None, parts, dtype) per input
        for t, q in zip(tensors, quantized, strict=True):
            pack, parts = _pack(t) if q else (None, [t])
            ctx.layout.append((pack, len(parts), t.dtype))
            saved += parts
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, inputs = list(ctx.saved_tensors), []
        for pack, n, dtype in ctx.layout:
            parts, saved = saved[:n], saved[n:]
            t = parts[0] if pack is None else _unpack(pack, parts, dtype)
            inputs.append(t.detach().requires_grad_(t.is_floating_point()))
        with torch.enable_grad():
            y = ctx.fn(*inputs)
        needs = ctx.needs_input_grad[2:]
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
        return None, None, *(next(grads) if need else None for need in needs)


def keep_fp8(fn: Callable, activations: tuple[torch.Tensor, ...], *others: torch.Tensor):
    """fn(*activations, *others), keeping `activations` in FP8 for backward (module docstring).
    Without a gradient to record, plain `fn`: nothing is quantized or saved."""
    tensors = (*activations, *others)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return fn(*tensors)
    quantized = (True,) * len(activations) + (False,) * len(others)
    return _KeepFP8.apply(fn, quantized, *tensors)
