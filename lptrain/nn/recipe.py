"""`Recipe`: a frozen, typed description of how a Linear runs its three GEMMs.

Vocabulary (algorithms.md §0): operands `input`, `weight`, `grad_output`; GEMMs `output`
(fprop, Y = X W^T, reduction over in-features K), `grad_input` (dgrad, dX = dY W, reduction
over out-features N), `grad_weight` (wgrad, dW = dY^T X, reduction over tokens T). Each GEMM
has one `QuantSpec` per operand (None = high precision); the layer sets each spec's `axis` to
that GEMM's reduction axis, so the `axis` written in a recipe is ignored.

A recipe round-trips through a plain dict (the YAML form); `from_dict` reports errors with the
field path (e.g. `grad_input.grad_output.format: unknown format 'fp9' ...`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from lptrain.numerics import QuantSpec

GEMMS: dict[str, tuple[str, str]] = {
    "output": ("input", "weight"),
    "grad_input": ("grad_output", "weight"),
    "grad_weight": ("grad_output", "input"),
}
BACKWARD_OPERANDS = ("requantize", "reuse")
SIGN_MODES = ("fixed", "per_call", "te_nvfp4")
ACCUMULATE = ("fp32", "int32")


class RecipeError(ValueError):
    """A recipe field is wrong; the message starts with the field path."""


@dataclass(frozen=True)
class GemmRecipe:
    """The two operand specs of one GEMM, in the order of GEMMS[gemm], plus accumulation.

    accumulate='int32' runs the GEMM as INT16 dynamic fixed point (both operands integer
    formats with per-tensor scaling) with INT32 accumulation over `chunk` products (§4).
    """

    a: QuantSpec | None = None
    b: QuantSpec | None = None
    accumulate: str = "fp32"
    chunk: int = 32

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
        for problem in _problems(self):
            raise RecipeError(problem)

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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for g, (a, b) in GEMMS.items():
            gr = self.gemm(g)
            out[g] = {
                a: gr.a.to_dict() if gr.a else None,
                b: gr.b.to_dict() if gr.b else None,
                "accumulate": gr.accumulate,
                "chunk": gr.chunk,
            }
        for f in fields(self):
            if f.name not in GEMMS and f.name != "name":
                out[f.name] = getattr(self, f.name)
        return out

    def replace(self, **changes: Any) -> "Recipe":
        return replace(self, **changes)


def _problems(r: Recipe):
    if r.backward_operands not in BACKWARD_OPERANDS:
        yield f"backward_operands: {r.backward_operands!r} is not one of {BACKWARD_OPERANDS}"
    if r.signs not in SIGN_MODES:
        yield f"signs: {r.signs!r} is not one of {SIGN_MODES}"
    for g, (a, b) in GEMMS.items():
        gr = r.gemm(g)
        if gr.accumulate not in ACCUMULATE:
            yield f"{g}.accumulate: {gr.accumulate!r} is not one of {ACCUMULATE}"
        if gr.chunk < 1:
            yield f"{g}.chunk: must be >= 1, got {gr.chunk}"
        if gr.accumulate == "int32":
            for op, s in ((a, gr.a), (b, gr.b)):
                if s is None or not s.fmt.is_int or s.scaling != "tensor" or s.hadamard:
                    yield (
                        f"{g}.{op}: accumulate='int32' needs an integer format with "
                        f"scaling='tensor' and no hadamard on both operands"
                    )
        ha = gr.a.hadamard if gr.a else None
        hb = gr.b.hadamard if gr.b else None
        if ha != hb:
            yield (
                f"{g}: hadamard differs between {a} ({ha}) and {b} ({hb}); both operands "
                f"of a GEMM must share the rotation for it to cancel"
            )
        sa = gr.a.hadamard_signs if gr.a else False
        sb = gr.b.hadamard_signs if gr.b else False
        if ha and hb and sa != sb:
            yield f"{g}: hadamard_signs differs between {a} and {b}; the signs must be shared"
    if r.wgrad_high_precision and r.grad_weight.quantized:
        yield "wgrad_high_precision: true but grad_weight has quantized operands; drop one"
    if r.trust_mask and r.output.a is None and r.output.b is None:
        yield "trust_mask: true needs a quantized output GEMM"


# ---------------------------------------------------------------------------------------
# dict / YAML form


def _spec_from(d: Any, path: str) -> QuantSpec | None:
    if d is None:
        return None
    if isinstance(d, QuantSpec):
        return d
    if not isinstance(d, dict):
        raise RecipeError(f"{path}: expected a mapping of QuantSpec fields or null, got {d!r}")
    known = {f.name for f in fields(QuantSpec)} - {"extra"}
    for k in d:
        if k not in known:
            raise RecipeError(f"{path}.{k}: unknown QuantSpec field; known: {sorted(known)}")
    kw = dict(d)
    if isinstance(kw.get("block_size"), list):
        kw["block_size"] = tuple(kw["block_size"])
    try:
        return QuantSpec(**kw)
    except (TypeError, ValueError) as e:
        field = _field_in(str(e), known)
        raise RecipeError(f"{path}{'.' + field if field else ''}: {e}") from None


def _field_in(message: str, known: set[str]) -> str | None:
    # QuantSpec messages start with the offending field name ("QuantSpec: format: ...").
    body = message.removeprefix("QuantSpec: ")
    head = body.split("=")[0].split(":")[0].split(" ")[0]
    return head if head in known else None


def _gemm_from(d: Any, gemm: str, base: GemmRecipe) -> GemmRecipe:
    a, b = GEMMS[gemm]
    if d is None:
        return GemmRecipe()
    if not isinstance(d, dict):
        raise RecipeError(f"{gemm}: expected a mapping with keys {a}, {b}, accumulate, chunk")
    allowed = {a, b, "accumulate", "chunk"}
    for k in d:
        if k not in allowed:
            raise RecipeError(f"{gemm}.{k}: unknown key; expected one of {sorted(allowed)}")
    spec_a = _merge_spec(base.a, d[a], f"{gemm}.{a}") if a in d else base.a
    spec_b = _merge_spec(base.b, d[b], f"{gemm}.{b}") if b in d else base.b
    acc = d.get("accumulate", base.accumulate)
    chunk = d.get("chunk", base.chunk)
    if not isinstance(chunk, int) or isinstance(chunk, bool):
        raise RecipeError(f"{gemm}.chunk: expected an int, got {chunk!r}")
    return GemmRecipe(spec_a, spec_b, acc, chunk)


def _merge_spec(base: QuantSpec | None, d: Any, path: str) -> QuantSpec | None:
    if d is None or base is None or not isinstance(d, dict):
        return _spec_from(d, path)
    merged = base.to_dict()
    merged.update(d)
    return _spec_from(merged, path)


_TOP = {
    "name",
    "base",
    "description",
    "backward_operands",
    "wgrad_high_precision",
    "trust_mask",
    "signs",
    *GEMMS,
}


def recipe_from_dict(d: dict[str, Any], base: Recipe | None = None) -> Recipe:
    """Build a Recipe from its dict form; `base` (or d['base'], a recipe name) supplies defaults.

    Fields not given keep the base's values; operand specs merge field by field, so
    `{base: nvfp4, grad_weight: {grad_output: {rounding: nearest}}}` changes one field.
    """
    if not isinstance(d, dict):
        raise RecipeError(f"recipe: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in _TOP:
            raise RecipeError(f"{k}: unknown recipe key; known: {sorted(_TOP)}")
    if "base" in d:
        from lptrain.nn.recipes import get

        try:
            base = get(d["base"])
        except ValueError as e:
            raise RecipeError(f"base: {e}") from None
    base = base or Recipe(name="custom")
    kw: dict[str, Any] = {}
    for g in GEMMS:
        kw[g] = _gemm_from(d[g], g, base.gemm(g)) if g in d else base.gemm(g)
    for key, typ in (
        ("backward_operands", str),
        ("signs", str),
        ("description", str),
        ("wgrad_high_precision", bool),
        ("trust_mask", bool),
        ("name", str),
    ):
        v = d.get(key, getattr(base, key) if key != "name" else d.get("name", base.name))
        if not isinstance(v, typ):
            raise RecipeError(f"{key}: expected {typ.__name__}, got {v!r}")
        kw[key] = v
    if "name" not in d and "base" in d:
        kw["name"] = f"{base.name}+custom"
    return Recipe(**kw)
