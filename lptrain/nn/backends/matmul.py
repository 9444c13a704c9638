"""C = A . B^T of two low-precision `Operand`s, in FP32, on the fastest path the operands allow:

* both FP8 with tensorwise or rowwise scales: the hardware FP8 GEMM (`torch._scaled_mm`), codes
  in, FP32 out; tensorwise scales go in as the GEMM's scales, rowwise ones are applied to the
  FP32 output (an exact rescale when they are powers of two, as fp8-rowwise's are), because
  `_scaled_mm` gives rowwise scales only a BF16 output on current GPUs;
* otherwise the dense values (FP8 codes convert to BF16 exactly; block formats were dequantized
  exactly into BF16 by the kernel where the products fit) in a BF16 GEMM with FP32 output on a
  GPU, FP32 elsewhere, then the per-tensor / per-row / two-level tensor scales on the output.

The emulated backend multiplies the fake-quantized FP32 operands instead, so the two agree up to
the order and the rounding of the accumulation: with u = 2^-24 and K the reduction length,

    |C - C_emulated| <= (2K + 16) u (|A| |B|^T)      elementwise,

|A|, |B| the fake-quantized operands' magnitudes (two recursive sums of K products, each within
K u of the exact sum, and at most 8 roundings of scale products). `bound` computes it; the tests
and the capability self-test hold both paths to it. On a GPU the FP8 tensor cores accumulate
with fewer mantissa bits between FP32 promotions (DeepSeek-V3 §3.3.2 measures about 14), so
`bound(..., device='cuda')` allows 2^-13 per product for that path (not yet validated on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lptrain.nn.backends.operand import Operand

U = 2.0**-24


def fp8_gemm_ok(a: Operand, b: Operand) -> bool:
    """Whether the pair goes to the FP8 GEMM: FP8 codes with tensor/row scales, not E5M2 x E5M2
    (cuBLAS has no such kernel), no two-level scale, a device with FP8 tensor cores (sm_89+;
    torch emulates `_scaled_mm` on CPUs)."""
    if not (a.is_fp8 and b.is_fp8) or a.gscale is not None or b.gscale is not None:
        return False
    if a.values.dtype == b.values.dtype == torch.float8_e5m2:
        return False
    dev = a.values.device
    return dev.type != "cuda" or torch.cuda.get_device_capability(dev) >= (8, 9)


def _pad16(t: torch.Tensor) -> torch.Tensor:
    """Zero rows/columns up to multiples of 16 (cuBLASLt's FP8 layout rule); zero codes add
    nothing to the sums."""
    pr, pc = (-t.shape[0]) % 16, (-t.shape[1]) % 16
    if not (pr or pc):
        return t.contiguous()
    return F.pad(t.view(torch.uint8), (0, pc, 0, pr)).view(t.dtype)


def _scaled_mm(a: Operand, b: Operand) -> torch.Tensor:
    m, n = a.shape[0], b.shape[0]
    qa, qb = a.values, b.values
    if qa.is_cuda:
        qa, qb = _pad16(qa), _pad16(qb)
    else:
        qa, qb = qa.contiguous(), qb.contiguous()
    one = torch.ones((), device=qa.device)
    tensorwise = not (a.rowwise or b.rowwise)
    sa = a.scale.reshape(()).float() if tensorwise and a.scale is not None else one
    sb = b.scale.reshape(()).float() if tensorwise and b.scale is not None else one
    out = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    out = out[:m, :n]
    if not tensorwise:
        out = _rescale(out, a, b)
    return out


def _rescale(out: torch.Tensor, a: Operand, b: Operand) -> torch.Tensor:
    if a.scale is not None:
        out = out * a.scale
    if b.scale is not None:
        out = out * b.scale.reshape(1, -1)
    return out


def _dense(op: Operand) -> torch.Tensor:
    return op.values.to(torch.bfloat16) if op.is_fp8 else op.values


_BF16_FP32_OUT = [True]  # torch.mm(..., out_dtype=float32) works here (until it does not)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) . b (N, K)^T with FP32 accumulation and output: BF16 tensor cores with an FP32
    output on a GPU (exact products, FP32 sums), else an FP32 GEMM of the same values."""
    if a.is_cuda and a.dtype == b.dtype == torch.bfloat16 and _BF16_FP32_OUT[0]:
        try:
            return torch.mm(a, b.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without the mm.dtype CUDA kernel
            _BF16_FP32_OUT[0] = False
    return a.to(torch.float32) @ b.to(torch.float32).t()


def gemm(a: Operand, b: Operand) -> torch.Tensor:
    """FP32 C = A . B^T (see the module docstring for the paths and the error bound)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"GEMM operands disagree on K: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
        dev = a.values.device
        return torch.zeros(a.shape[0], b.shape[0], device=dev)
    if fp8_gemm_ok(a, b):
        return _scaled_mm(a, b)
    out = _rescale(_mm(_dense(a), _dense(b)), a, b)
    if a.gscale is not None:
        out = out * a.gscale
    if b.gscale is not None:
        out = out * b.gscale
    return out


def bound(a_hat: torch.Tensor, b_hat: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The elementwise bound on |gemm - emulated| for fake-quantized operands A^, B^."""
    k = a_hat.shape[1]
    per = (2 * k + 16) * U + (k * 2.0**-13 if device == "cuda" else 0.0)
    return per * (a_hat.double().abs() @ b_hat.double().abs().T)
