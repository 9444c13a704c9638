"""`Recipe`: a frozen, typed description of how a Linear runs its three GEMMs.

Vocabulary (algorithms.md §0): operands `input`, `weight`, `grad_output`; GEMMs `output`
(fprop, Y = X W^T, reduction over in-features K), `grad_input` (dgrad, dX = dY W, reduction
over out-features N), `grad_weight` (wgrad, dW = dY^T X, reduction over tokens T). Each GEMM
has one `QuantSpec` per operand (None = high precision); the layer sets each spec's `axis` to
that GEMM's reduction axis, so the `axis` written in a recipe is ignored.

This module holds the types only. The named recipes are in `catalog.py`; the dict / YAML
form and name lookup in `resolve.py` (imports flow one way: recipe <- catalog <- resolve;
`lptrain.recipes` is the public face of all three).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from lptrain.errors import ConfigError
from lptrain.numerics import QuantSpec

GEMMS: dict[str, tuple[str, str]] = {
    "output": ("input", "weight"),
    "grad_input": ("grad_output", "weight"),
    "grad_weight": ("grad_output", "input"),
}
BACKWARD_OPERANDS = ("requantize", "reuse")
SIGN_MODES = ("fixed", "per_call", "te_nvfp4")
ACCUMULATE = ("fp32", "int32")
INT32_OVERFLOWS = ("recompute", "wrap")


class RecipeError(ConfigError):
    """A recipe field is wrong; `path` names it inside the recipe (`grad_weight.grad_output`)."""


@dataclass(frozen=True)
class GemmRecipe:
    """The two operand specs of one GEMM, in the order of GEMMS[gemm], plus accumulation.

    accumulate='int32' runs the GEMM as INT16 dynamic fixed point (both operands integer
    formats with per-tensor scaling) with INT32 accumulation over `chunk` products (§4).
    overflow: 'recompute' (default: a chunk sum that does not fit INT32 is detected and
    recomputed exactly, so the default cannot wrap) or 'wrap' (the bare register, for studies).
    """

    a: QuantSpec | None = None
    b: QuantSpec | None = None
    accumulate: str = "fp32"
    chunk: int = 32
    overflow: str = "recompute"

    @property
    def quantized(self) -> bool:
        return self.a is not None or self.b is not None


@dataclass(frozen=True)
class Recipe:
    """Per-GEMM operand quantizers plus options.

    backward_operands: 'requantize' quantizes the backward operands from high precision along
    the backward reduction axis (TE, torchao); 'reuse' feeds the forward-quantized values
    (rotated, if the forward has a Hadamard) to the backward quantizers (Quartet §3.6).
    wgrad_high_precision: the grad_weight GEMM runs unquantized. trust_mask: the
    straight-through estimator zeroes gradients of forward values clipped by the quantizer
    (QuEST). signs: how random Hadamard sign vectors are drawn for specs with hadamard_signs:
    'fixed' once per GEMM when the layer is built (saved in the state_dict), 'per_call' fresh
    for every call (Quartet's re-randomized backward), 'te_nvfp4' TE's fixed NVFP4 vector.
    """

    name: str
    output: GemmRecipe = GemmRecipe()
    grad_input: GemmRecipe = GemmRecipe()
    grad_weight: GemmRecipe = GemmRecipe()
    backward_operands: str = "requantize"
    wgrad_high_precision: bool = False
    trust_mask: bool = False
    signs: str = "fixed"
    description: str = ""

    def __post_init__(self) -> None:
        for path, problem in _problems(self):
            raise RecipeError(path, problem)

    def gemm(self, name: str) -> GemmRecipe:
        return getattr(self, name)

    @property
    def quantizes(self) -> bool:
        return any(self.gemm(g).quantized for g in GEMMS)

    def spec(self, gemm: str, operand: str) -> QuantSpec | None:
        a, b = GEMMS[gemm]
        g = self.gemm(gemm)
        if operand not in (a, b):
            raise KeyError(f"GEMM {gemm!r} has operands {a!r} and {b!r}, not {operand!r}")
        return g.a if operand == a else g.b

    def hadamard(self, gemm: str) -> int | None:
        """The rotation size shared by the GEMM's two operands (validated equal), or None."""
        gr = self.gemm(gemm)
        return next((s.hadamard for s in (gr.a, gr.b) if s is not None and s.hadamard), None)

    def needs_signs(self, gemm: str) -> bool:
        """Whether the GEMM's rotation carries random sign flips (D . H)."""
        gr = self.gemm(gemm)
        return any(s is not None and s.hadamard_signs for s in (gr.a, gr.b))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for g, (a, b) in GEMMS.items():
            gr = self.gemm(g)
            out[g] = {
                a: gr.a.to_dict() if gr.a else None,
                b: gr.b.to_dict() if gr.b else None,
                "accumulate": gr.accumulate,
                "chunk": gr.chunk,
                "overflow": gr.overflow,
            }
        for f in fields(self):
            if f.name not in GEMMS and f.name != "name":
                out[f.name] = getattr(self, f.name)
        return out

    def replace(self, **changes: Any) -> "Recipe":
        return replace(self, **changes)

    def runs_like(self, other: "Recipe") -> bool:
        """The same GEMMs and options, whatever the two are named or described."""
        return replace(self, name=other.name, description=other.description) == other

    def take(self, source: "Recipe", gemm: str, operand: str | None = None) -> "Recipe":
        """This recipe with GEMM `gemm` run as `source` runs it: both operand specs and the
        accumulation, or with `operand` that operand's spec alone. Named
        `<name>[<gemm>[.<operand>]=<source name>, ...]` (a later take of the same GEMM
        replaces its part). The options that belong to one GEMM follow it:
        `wgrad_high_precision` stays only while grad_weight quantizes nothing, `trust_mask`
        only while the output GEMM quantizes (it masks that GEMM's clipping); the other
        options stay this recipe's (with backward_operands 'reuse' a high-precision backward
        GEMM still reads the forward's quantized copies). RecipeError when the result is no
        valid recipe (two operands of a GEMM with different rotations)."""
        a, b = GEMMS[gemm]
        mine, theirs = self.gemm(gemm), source.gemm(gemm)
        if operand is None:
            new = theirs
        elif operand in (a, b):
            new = replace(mine, a=theirs.a) if operand == a else replace(mine, b=theirs.b)
        else:
            raise RecipeError(gemm, f"has operands {a!r} and {b!r}, not {operand!r}")
        key = gemm if operand is None else f"{gemm}.{operand}"
        output = new if gemm == "output" else self.output
        wgrad = new if gemm == "grad_weight" else self.grad_weight
        return replace(
            self,
            **{gemm: new},
            name=_renamed(self.name, key, source.name),
            wgrad_high_precision=self.wgrad_high_precision and not wgrad.quantized,
            trust_mask=self.trust_mask and output.quantized,
        )


def _renamed(name: str, key: str, source: str) -> str:
    """`name[key=source]`, that part after the earlier ones, instead of an earlier part for
    the same key (a whole GEMM's part also replaces the parts of its operands):
    `nvfp4[grad_weight=bf16, output.input=fp8-current]`."""
    head, bracket, tail = name.partition("[")
    parts = tail[:-1].split(", ") if bracket and tail.endswith("]") else []
    if bracket and not parts:
        head = name  # a bracket of someone else's: part of the name
    gemm = key.split(".")[0]
    kept = [
        p
        for p in parts
        if not p.startswith(f"{key}=") and not (key == gemm and p.startswith(f"{gemm}."))
    ]
    return f"{head}[{', '.join([*kept, f'{key}={source}'])}]"


def _problems(r: Recipe):
    if r.backward_operands not in BACKWARD_OPERANDS:
        yield "backward_operands", f"{r.backward_operands!r} is not one of {BACKWARD_OPERANDS}"
    if r.signs not in SIGN_MODES:
        yield "signs", f"{r.signs!r} is not one of {SIGN_MODES}"
    for g, (a, b) in GEMMS.items():
        gr = r.gemm(g)
        if gr.accumulate not in ACCUMULATE:
            yield f"{g}.accumulate", f"{gr.accumulate!r} is not one of {ACCUMULATE}"
        if gr.chunk < 1:
            yield f"{g}.chunk", f"must be >= 1, got {gr.chunk}"
        if gr.overflow not in INT32_OVERFLOWS:
            yield f"{g}.overflow", f"{gr.overflow!r} is not one of {INT32_OVERFLOWS}"
        if gr.accumulate != "int32" and (gr.chunk != 32 or gr.overflow != "recompute"):
            yield f"{g}", "chunk and overflow apply to accumulate='int32' only"
        if gr.accumulate == "int32":
            for op, s in ((a, gr.a), (b, gr.b)):
                if s is None or not s.fmt.is_int or s.scaling != "tensor" or s.hadamard:
                    yield (
                        f"{g}.{op}",
                        "accumulate='int32' needs an integer format with "
                        "scaling='tensor' and no hadamard on both operands",
                    )
        ha = gr.a.hadamard if gr.a else None
        hb = gr.b.hadamard if gr.b else None
        if ha != hb:
            yield (
                f"{g}",
                f"hadamard differs between {a} ({ha}) and {b} ({hb}); both operands "
                f"of a GEMM must share the rotation for it to cancel",
            )
        sa = gr.a.hadamard_signs if gr.a else False
        sb = gr.b.hadamard_signs if gr.b else False
        if ha and hb and sa != sb:
            yield f"{g}", f"hadamard_signs differs between {a} and {b}; the signs must be shared"
    if r.wgrad_high_precision and r.grad_weight.quantized:
        yield "wgrad_high_precision", "true but grad_weight has quantized operands; drop one"
    if r.trust_mask and r.output.a is None and r.output.b is None:
        yield "trust_mask", "true needs a quantized output GEMM"
