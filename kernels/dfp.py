"""INT16 (INT8, INT4) dynamic fixed point quantize: reference lptrain.numerics.dfp_quantize
with one exponent per tensor (axis=None), round-to-nearest-even or stochastic.

One read for the amax (kernels/amax.py), then one fused pass: multiply by 2^-E (exact), round
to an integer, saturate at 2^(bits-1) - 1, write the int mantissas. The exponent is the
reference's `dfp_exponent` of the amax.
"""

from __future__ import annotations

import torch

from lptrain.kernels.amax import amax_2d
from lptrain.kernels.launch import TENSOR_MODE, launch
from lptrain.numerics import DFPTensor
from lptrain.numerics.dfp import dfp_exponent

FORMATS = {4: "int4", 8: "int8", 16: "int16"}


def quantize_dfp(
    x: torch.Tensor, *, bits: int = 16, rounding: str = "nearest", seed: int | None = None
) -> DFPTensor:
    """DFP mantissas (int16 tensor of x's shape) and the shared exponent (0-d int32) of a 2-D
    tensor. NaN/Inf inputs raise ValueError like the reference. `seed` keys stochastic
    rounding (required for rounding='stochastic')."""
    if bits not in FORMATS:
        raise ValueError(f"the DFP kernel supports bits in {sorted(FORMATS)}, got {bits}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed")
    a = amax_2d(x)
    if bool(a.tensor_bad):
        raise ValueError("dfp_quantize: input has NaN or Inf; DFP has no encoding for them")
    exp = dfp_exponent(a.tensor, bits)
    if not -126 <= int(exp) <= 126:
        # 2^-E is not a normal FP32 number: one multiply would not be exact. Such tensors
        # (amax below 2^-112 or above 2^140) are not worth a kernel: the reference does it.
        from lptrain.numerics import dfp_quantize

        gen = torch.Generator(device=x.device).manual_seed(int(seed or 0))
        return dfp_quantize(x, bits=bits, rounding=rounding, generator=gen)
    one = torch.ones(1, device=x.device)
    enc, dec = torch.ldexp(one, -exp), torch.ldexp(one, exp)
    seed = seed if rounding == "stochastic" else None
    out = launch(x, FORMATS[bits], TENSOR_MODE, enc=enc, dec=dec, seed=seed)
    return DFPTensor(out.codes.to(torch.int16), exp)
