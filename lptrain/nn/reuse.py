"""Which backward operands may reuse a quantized copy made by an earlier GEMM of the same call.

TE and torchao reuse their FP8 copies the same way. A reuse must be bit-exact: the backward
gets exactly the values that quantizing again along the backward axis would give (a test
compares the two for every recipe).
"""

from __future__ import annotations

from lptrain.nn.recipe import Recipe
from lptrain.numerics import QuantSpec

# Backward operands that may reuse an earlier GEMM's quantized copy: (gemm, operand, source).
REUSABLE = (
    ("grad_input", "weight", "output"),
    ("grad_weight", "input", "output"),
    ("grad_weight", "grad_output", "grad_input"),
)


def axis_free(spec: QuantSpec | None) -> bool:
    """Quantization that does not depend on the axis it runs along: a transpose of the
    quantized tensor equals quantizing the transpose (RNE, no rotation, and scales that see
    the same elements either way). Per-tensor scaling qualifies (delayed too: a second history
    fed the same amaxes gives the same scales), and so do square tiles such as fp8-block's
    128x128 or nvfp4's 16x16 weight tiles: a transposed tile holds the same elements, and
    both roles pad rows and reduction axis to the same tile multiple."""
    if spec is None or spec.hadamard is not None or spec.rounding != "nearest":
        return False
    square_tile = spec.tile is not None and spec.tile[0] == spec.tile[1]
    return spec.scaling in ("none", "tensor", "delayed") or square_tile


def aliases(recipe: Recipe) -> dict[tuple[str, str], str]:
    """{(gemm, operand): source gemm} where the backward reuses a quantized copy bit-exactly
    instead of quantizing again."""
    if recipe.backward_operands == "reuse":
        return {}
    out = {}
    for gemm, op, src in REUSABLE:
        spec = recipe.spec(gemm, op)
        same_acc = recipe.gemm(gemm).accumulate == recipe.gemm(src).accumulate == "fp32"
        if same_acc and axis_free(spec) and spec == recipe.spec(src, op):
            out[(gemm, op)] = src
    return out
