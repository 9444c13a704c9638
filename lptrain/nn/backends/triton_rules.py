"""What the Triton backend runs and how, as pure functions (no Triton import): whether a
recipe's quantizers are within the kernels' reach (`recipe_problem`, the backend's `supports`),
when a block format's dequantized values are exact in BF16 (`bf16_exact`), and when dY's
column-wise copy serves the weight-gradient GEMM (`colwise_dy`).
"""

from __future__ import annotations

from lptrain.nn.recipe import GEMMS
from lptrain.numerics import QuantSpec

DFP_BITS = (4, 8, 16)  # the DFP kernel's integer formats (int4 / int8 / int16)


def spec_problem(spec: QuantSpec) -> str | None:
    """Why the kernels cannot quantize `spec` exactly as the reference does, or None."""
    fmt = spec.fmt
    if spec.axis not in (-1, 1):
        return f"axis={spec.axis}: the GEMMs quantize along the reduction axis (the last)"
    if not fmt.is_int and (fmt.mbits > 22 or fmt.emin < -125 or not fmt.subnormals):
        return f"format {fmt.name}: outside the FP32 bit-pattern rounding the kernels use"
    if fmt.is_int and fmt.bits > 16:
        return f"format {fmt.name}: integer codes wider than 16 bits"
    sizes = [spec.hadamard or 1]
    if spec.scaling == "block":
        sizes += list(spec.tile) if spec.tile is not None else [spec.block_size]
    if any(s & (s - 1) for s in sizes):
        return f"block / Hadamard sizes {sizes} must be powers of two for the Triton tiles"
    if spec.hadamard and spec.hadamard > 256:
        return f"hadamard={spec.hadamard}: the in-register butterfly goes up to 256"
    return None


def recipe_problem(recipe) -> str | None:
    for g, (a, b) in GEMMS.items():
        gr = recipe.gemm(g)
        if gr.accumulate == "int32":
            for op, s in ((a, gr.a), (b, gr.b)):
                if s.fmt.bits not in DFP_BITS:
                    return f"{g}.{op}: DFP with {s.fmt.bits} bits (the kernel has {DFP_BITS})"
            continue
        for op, s in ((a, gr.a), (b, gr.b)):
            why = spec_problem(s) if s is not None else None
            if why:
                return f"{g}.{op}: {why}"
    return None


def bf16_exact(spec: QuantSpec) -> bool:
    """Whether every `q . block scale` of the spec is a BF16 number (8 significant bits): the
    element's significand bits plus the scale's. Else the dense operand stays FP32."""
    fmt = spec.fmt
    elem = fmt.mbits if fmt.is_int else fmt.mbits + 1
    if spec.two_level:
        scale = 4  # UE4M3 / UE5M3 values; the tensor scale is applied to the GEMM output
    elif spec.scale_format == "e8m0" or spec.scale_from == "std" or spec.pow2_scale:
        scale = 1 if spec.headroom == 1.0 else 24
    else:
        scale = 24
    return elem + scale <= 8


def colwise_dy(call) -> bool:
    """Whether the grad_input GEMM should also write dY quantized column-wise (one pass over dY
    for both backward GEMMs): rowwise FP8 round-to-nearest with the same spec in grad_weight."""
    r = call.recipe
    spec = r.spec("grad_input", "grad_output")
    return (
        spec is not None
        and spec.scaling == "row"
        and spec.rounding == "nearest"
        and spec.hadamard is None
        and r.grad_weight.quantized
        and not r.wgrad_high_precision
        and r.spec("grad_weight", "grad_output") == spec
        and r.grad_input.accumulate == r.grad_weight.accumulate == "fp32"
    )
