"""The named precision recipes (`lptrain.recipes.get(name)`, `names()`), each documented in prose.

Every recipe is plain data built from `QuantSpec`s; the layer never branches on a recipe name.
"""

from __future__ import annotations

from typing import Any

from lptrain.nn.recipe import GemmRecipe, Recipe
from lptrain.numerics import QuantSpec

E4M3, E5M2 = "fp8_e4m3", "fp8_e5m2"


def _same(a: QuantSpec | None, b: QuantSpec | None, **kw: Any) -> dict[str, GemmRecipe]:
    """Input/weight spec `a` and grad_output spec `b` in all three GEMMs."""
    return {
        "output": GemmRecipe(a, a, **kw),
        "grad_input": GemmRecipe(b, a, **kw),
        "grad_weight": GemmRecipe(b, a, **kw),
    }


def _fp8_delayed() -> Recipe:
    # delayed_init='current': TE starts every scale at 1, which underflows small gradients in
    # E5M2 on the first step (measured on the main job: 63% of grad_output elements, weight
    # gradient cosine to FP32 0.69); current scaling until the history holds an amax fixes it
    # (0%, cosine 0.998). From the second call on, TE's rule exactly.
    kw = dict(scaling="delayed", history_len=1024, amax_algo="max", delayed_init="current")
    fwd = QuantSpec(E4M3, **kw)
    bwd = QuantSpec(E5M2, **kw)
    return Recipe(
        "fp8-delayed",
        **_same(fwd, bwd),
        description=(
            "TransformerEngine DelayedScaling, HYBRID format: per-tensor E4M3 for input and "
            "weight, E5M2 for grad_output, each scale computed from the max over a 1024-step "
            "amax history (margin 0), the scale of step t used before its amax is recorded; "
            "unlike TE, the first call (empty history) uses current scaling instead of scale 1. "
            "Backward operands are re-quantized from high precision with their own histories, "
            "which see the same amaxes as TE's reused copies and so give the same values."
        ),
    )


def _fp8_current() -> Recipe:
    return Recipe(
        "fp8-current",
        **_same(QuantSpec(E4M3), QuantSpec(E5M2)),
        description=(
            "Per-tensor current scaling (TE Float8CurrentScaling; the semantics of torchao's "
            "tensorwise Float8Linear): enc = max / amax of the tensor being quantized now, E4M3 "
            "for input and weight, E5M2 for grad_output, saturating RNE casts."
        ),
    )


def _fp8_rowwise() -> Recipe:
    s = QuantSpec(E4M3, scaling="row", pow2_scale=True)
    return Recipe(
        "fp8-rowwise",
        **_same(s, s),
        description=(
            "Row-wise scaling (torchao 'rowwise'): one scale per row along each GEMM's reduction "
            "axis (per token and per output channel in fprop, per column for wgrad), E4M3 for all "
            "operands, scales rounded down to powers of two."
        ),
    )


def _fp8_block() -> Recipe:
    act = QuantSpec(E4M3, scaling="block", block_size=128, pow2_scale=True)
    w = QuantSpec(E4M3, scaling="block", block_size=(128, 128), pow2_scale=True)
    gemms = {
        "output": GemmRecipe(act, w),
        "grad_input": GemmRecipe(act, w),
        "grad_weight": GemmRecipe(act, act),
    }
    return Recipe(
        "fp8-block",
        **gemms,
        description=(
            "DeepSeek-V3 / TE Float8BlockScaling: E4M3 everywhere, 1x128 blocks along the "
            "reduction axis for activations and gradients, 128x128 tiles for weights, FP32 scales "
            "rounded down to powers of two."
        ),
    )


def _mx(name: str, fwd_fmt: str, bwd_fmt: str, bwd_rounding: str, text: str) -> Recipe:
    mx = dict(scaling="block", block_size=32, scale_format="e8m0", scale_rounding="floor")
    fwd = QuantSpec(fwd_fmt, **mx)
    # Stochastic rounding is only unbiased if nothing clips; the floor rule lets a block max
    # reach 2^(emax+1) > max, so SR gradients get a 3/4 pre-scale (Tseng et al. 2025).
    headroom = 4 / 3 if bwd_rounding == "stochastic" else 1.0
    bwd = QuantSpec(bwd_fmt, rounding=bwd_rounding, headroom=headroom, **mx)
    return Recipe(name, **_same(fwd, bwd), description=text)


def _nvfp4() -> Recipe:
    nv = dict(scaling="block", scale_format="ue4m3")
    act = QuantSpec("fp4_e2m1", block_size=16, **nv)
    w = QuantSpec("fp4_e2m1", block_size=(16, 16), **nv)
    grad = QuantSpec("fp4_e2m1", block_size=16, rounding="stochastic", **nv)
    rht = dict(hadamard=16, hadamard_signs=True)
    gemms = {
        "output": GemmRecipe(act, w),
        "grad_input": GemmRecipe(grad, w),
        "grad_weight": GemmRecipe(grad.replace(**rht), act.replace(**rht)),
    }
    return Recipe(
        "nvfp4",
        **gemms,
        signs="te_nvfp4",
        description=(
            "NVIDIA NVFP4 (TE NVFP4BlockScaling): E2M1 elements, 16-element blocks with E4M3 "
            "block scales under an FP32 tensor scale, 16x16 2-D tiles for weights; grad_output "
            "stochastically rounded; a 16-point random Hadamard (TE's fixed sign vector) on both "
            "wgrad operands along the token axis."
        ),
    )


def _quartet() -> Recipe:
    fwd = QuantSpec(
        "fp4_e2m1",
        scaling="block",
        block_size=32,
        scale_format="e8m0",
        scale_from="std",
        hadamard=32,
    )
    bwd = QuantSpec(
        "fp4_e2m1",
        scaling="block",
        block_size=32,
        scale_format="e8m0",
        scale_rounding="floor",
        headroom=4 / 3,
        rounding="stochastic",
        hadamard=32,
        hadamard_signs=True,
    )
    gemms = {
        "output": GemmRecipe(fwd, fwd),
        "grad_input": GemmRecipe(bwd, bwd),
        "grad_weight": GemmRecipe(bwd, bwd),
    }
    return Recipe(
        "quartet",
        **gemms,
        backward_operands="reuse",
        trust_mask=True,
        signs="per_call",
        description=(
            "Quartet (Castro et al. 2025, algorithms.md §3.6): MXFP4 forward with QuEST "
            "(Hadamard 32, power-of-two scale clipping at the Gaussian-optimal 2.92 sigma, trust "
            "mask on the straight-through gradient); backward re-quantizes the forward-quantized "
            "operands to MXFP4 with a 3/4 pre-scale and stochastic rounding after a randomized "
            "Hadamard (D.H) whose signs are re-drawn every call."
        ),
    )


def _fp4_ue5m3() -> Recipe:
    ue = dict(scaling="block", scale_format="ue5m3", hadamard=16, hadamard_signs=True)
    act = w = QuantSpec("fp4_e2m1", block_size=16, **ue)
    grad = QuantSpec("fp4_e2m1", block_size=16, rounding="stochastic", **ue)
    gemms = {
        "output": GemmRecipe(act, w),
        "grad_input": GemmRecipe(grad, w),
        "grad_weight": GemmRecipe(grad, act),
    }
    return Recipe(
        "fp4-ue5m3",
        **gemms,
        description=(
            "The best trade-off of 'Elucidating the Design Space of FP4 Training' (Hu et al. "
            "2025): E2M1 elements in 16-blocks with UE5M3 block scales under an FP32 tensor scale "
            "(target 448), a 16-point randomized Hadamard on every GEMM's reduction axis (signs "
            "fixed per GEMM at build time), stochastic rounding on grad_output. Set amax_refresh: "
            "50 to reproduce the follow-up's sample-and-hold tensor reference."
        ),
    )


def _int16_dfp() -> Recipe:
    s = QuantSpec("int16", scaling="tensor")
    g = GemmRecipe(s, s, accumulate="int32", chunk=32)
    return Recipe(
        "int16-dfp",
        output=g,
        grad_input=g,
        grad_weight=g,
        description=(
            "Das et al. 2018 (algorithms.md §4): INT16 dynamic fixed point operands with one "
            "shared exponent per tensor (max magnitude in [2^14, 2^15)), INT16 x INT16 products "
            "accumulated in INT32 over chunks of 32 and converted to FP32 per chunk, in all three "
            "GEMMs; accumulator overflows are counted."
        ),
    )


def _mxint8() -> Recipe:
    s = QuantSpec("int8", scaling="block", block_size=32, scale_format="e8m0")
    return Recipe(
        "mxint8",
        **_same(s, s),
        description=(
            "OCP MXINT8: 32-element blocks of int8 with an E8M0 shared exponent (floor rule), on "
            "all operands of all three GEMMs."
        ),
    )


_BUILDERS = {
    "fp32": lambda: Recipe("fp32", description="No quantization: the FP32 baseline."),
    "bf16": lambda: Recipe(
        "bf16",
        description=(
            "No quantization by lptrain: the BF16 baseline (the trainer runs the model in bf16)."
        ),
    ),
    "fp8-delayed": _fp8_delayed,
    "fp8-current": _fp8_current,
    "fp8-rowwise": _fp8_rowwise,
    "fp8-block": _fp8_block,
    "mxfp8": lambda: _mx(
        "mxfp8",
        E4M3,
        E4M3,
        "nearest",
        (
            "OCP MXFP8: E4M3 elements in 32-blocks along the reduction axis with an E8M0 shared "
            "exponent (OCP floor rule), all operands, round-to-nearest-even."
        ),
    ),
    "mxfp6": lambda: _mx(
        "mxfp6",
        "fp6_e2m3",
        "fp6_e3m2",
        "nearest",
        (
            "OCP MXFP6: 32-blocks with E8M0 scales; E2M3 (more mantissa) for input and weight, "
            "E3M2 (more range) for grad_output."
        ),
    ),
    "mxfp4": lambda: _mx(
        "mxfp4",
        "fp4_e2m1",
        "fp4_e2m1",
        "stochastic",
        (
            "OCP MXFP4: E2M1 elements in 32-blocks with E8M0 scales (floor rule); grad_output "
            "stochastically rounded after a 3/4 pre-scale (headroom 4/3) so that no element "
            "clips and the rounding stays unbiased (Tseng et al. 2025)."
        ),
    ),
    "nvfp4": _nvfp4,
    "quartet": _quartet,
    "fp4-ue5m3": _fp4_ue5m3,
    "int16-dfp": _int16_dfp,
    "mxint8": _mxint8,
}
_CACHE: dict[str, Recipe] = {}


def names() -> list[str]:
    return list(_BUILDERS)


def get(name: str | Recipe) -> Recipe:
    """A named recipe (or the Recipe itself). Unknown names raise ValueError listing them."""
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(names())}")
    if name not in _CACHE:
        _CACHE[name] = _BUILDERS[name]()
    return _CACHE[name]
