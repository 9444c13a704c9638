"""The recipe -> TransformerEngine recipe mapping of `backend: te`, as data (no TE import).

Each TE recipe class, with the values of its fields, is written here as the lptrain Recipe it
computes (`TEMPLATES`). A recipe maps to TE when it equals one of those templates field for
field (name and description aside, block-scale roundings spelled out), so every recipe field
is mapped explicitly (formats E4M3/HYBRID, margin, history length, amax algorithm,
power-of-two scales, block dimensions, E8M0 rounding, RHT, stochastic rounding, 2-D weight
tiles), and a recipe that equals none is refused with the field that differs from the closest
template. TE's environment-variable defaults (NVTE_*) are all overridden with explicit values,
so the environment never changes the numbers. `TEMapping.build()` makes the TE object.

Two numerical differences no recipe field expresses (docs/gpu.md), so a mapped recipe still
differs from TE in them:
* current scaling's overflowing scale: when fp8_max / amax is infinite (amax below 448 / FLT_MAX
  = 1.3e-36 for E4M3, 57344 / FLT_MAX = 1.7e-34 for E5M2), TE's CUDA kernel
  (`compute_scale_from_amax`) uses FLT_MAX; lptrain, like TE's own Python reference, uses the
  input dtype's largest value. Identical for FP32 inputs and unreachable for FP16 ones (their
  smallest amax, 6e-8, gives a finite scale); for BF16 inputs that small the scale is BF16's
  max, 3.3895e38, instead of 3.4028e38, and the codes differ.
* accumulation: TE runs the forward (fprop) FP8 GEMM with fast accumulation (cuBLASLt without
  split accumulation: Hopper's tensor cores keep the partial sums in reduced precision) and the
  two backward GEMMs with FP32 promotion; lptrain's Triton backend runs all three without fast
  accumulation (`torch._scaled_mm` default). TE's forward is therefore outside the
  accumulation bound `matmul.bound` holds the Triton backend to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from lptrain.nn.recipe import GEMMS, GemmRecipe, Recipe
from lptrain.numerics import QuantSpec

E4M3, E5M2 = "fp8_e4m3", "fp8_e5m2"


class TEUnsupported(ValueError):
    """The recipe has no TransformerEngine equivalent; the message says why."""


@dataclass(frozen=True)
class TEMapping:
    """A TE recipe as data: `transformer_engine.common.recipe.<cls>(**kwargs)`, then `attrs`
    set on it (TE keeps its QParams as class attributes, not constructor fields). Format names
    stand for `Format.<name>`; a dict under attrs stands for `QParams(**dict)`."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def build(self):
        """The TE recipe object (needs TransformerEngine)."""
        from transformer_engine.common import recipe as R  # optional dependency (the te extra)

        kw = {
            k: getattr(R.Format, v) if k.endswith("_format") else v for k, v in self.kwargs.items()
        }
        out = getattr(R, self.cls)(**kw)
        for name, qparams in self.attrs.items():
            setattr(out, name, R.QParams(**qparams))
        return out


def _gemms(inp: QuantSpec, weight: QuantSpec, grad: QuantSpec, **rht) -> dict[str, GemmRecipe]:
    """TE's roles in lptrain's three GEMMs (wgrad operands optionally rotated)."""
    return {
        "output": GemmRecipe(inp, weight),
        "grad_input": GemmRecipe(grad, weight),
        "grad_weight": GemmRecipe(grad.replace(**rht), inp.replace(**rht)),
    }


def _grad_fmt(fp8_format: str) -> str:
    return E5M2 if fp8_format == "HYBRID" else E4M3


def _delayed(fp8_format, margin, amax_history_len, amax_compute_algo) -> Recipe:
    s = QuantSpec(
        E4M3,
        scaling="delayed",
        history_len=amax_history_len,
        amax_algo=amax_compute_algo,
        margin=margin,
    )
    return Recipe("te", **_gemms(s, s, s.replace(format=_grad_fmt(fp8_format))))


def _current(fp8_format, pow2) -> Recipe:
    s = QuantSpec(E4M3, pow2_scale=pow2)
    return Recipe("te", **_gemms(s, s, s.replace(format=_grad_fmt(fp8_format))))


def _block(fp8_format, w_block_scaling_dim, pow2) -> Recipe:
    act = QuantSpec(E4M3, scaling="block", block_size=128, pow2_scale=pow2)
    w = act.replace(block_size=(128, 128)) if w_block_scaling_dim == 2 else act
    return Recipe("te", **_gemms(act, w, act.replace(format=_grad_fmt(fp8_format))))


def _mxfp8(fp8_format) -> Recipe:
    # TE's MXFP8 kernels round the E8M0 scale up (algorithms.md §2.6): 'ceil'.
    s = QuantSpec(E4M3, scaling="block", block_size=32, scale_format="e8m0", scale_rounding="ceil")
    return Recipe("te", **_gemms(s, s, s.replace(format=_grad_fmt(fp8_format))))


def _nvfp4(rht, sr, two_d) -> Recipe:
    act = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")
    w = act.replace(block_size=(16, 16)) if two_d else act
    grad = act.replace(rounding="stochastic") if sr else act
    gemms = _gemms(act, w, grad, **(dict(hadamard=16, hadamard_signs=True) if rht else {}))
    return Recipe("te", **gemms, signs="te_nvfp4" if rht else "fixed")


def _qparams(pow2: bool) -> dict[str, dict[str, Any]]:
    q = dict(power_2_scale=pow2, amax_epsilon=0.0)
    return {f"fp8_quant_{r}": q for r in ("fwd_inp", "fwd_weight", "bwd_grad")}


# The oldest TransformerEngine release that builds a recipe class as mapped here, where it is
# newer than the te extra's floor (2.4): below 2.9, NVFP4BlockScaling fails (AttributeError).
MIN_TE: dict[str, tuple[int, int]] = {"NVFP4BlockScaling": (2, 9)}

FP8_FORMATS = ("HYBRID", "E4M3")
_B = (False, True)

# TE recipe class -> every (mapping, template) it offers: the mapping table.
TEMPLATES: dict[str, Callable[[QuantSpec], list[tuple[TEMapping, Recipe]]]] = {
    "DelayedScaling": lambda s: [
        (
            TEMapping(
                "DelayedScaling",
                dict(
                    fp8_format=f,
                    margin=s.margin,
                    amax_history_len=s.history_len,
                    amax_compute_algo=s.amax_algo,
                    reduce_amax=True,
                    backward_override=None,
                ),
            ),
            _delayed(f, s.margin, s.history_len, s.amax_algo),
        )
        for f in FP8_FORMATS
    ],
    "Float8CurrentScaling": lambda s: [
        (
            TEMapping(
                "Float8CurrentScaling", dict(fp8_format=f, backward_override=None), _qparams(p)
            ),
            _current(f, p),
        )
        for f in FP8_FORMATS
        for p in _B
    ],
    "Float8BlockScaling": lambda s: [
        (
            TEMapping(
                "Float8BlockScaling",
                dict(
                    fp8_format=f,
                    x_block_scaling_dim=1,
                    w_block_scaling_dim=d,
                    grad_block_scaling_dim=1,
                    backward_override=None,
                ),
                _qparams(p),
            ),
            _block(f, d, p),
        )
        for f in ("E4M3", "HYBRID")
        for d in (2, 1)
        for p in (True, False)
    ],
    "MXFP8BlockScaling": lambda s: [
        (TEMapping("MXFP8BlockScaling", dict(fp8_format=f, backward_override=None)), _mxfp8(f))
        for f in ("E4M3", "HYBRID")
    ],
    "NVFP4BlockScaling": lambda s: [
        (
            TEMapping(
                "NVFP4BlockScaling",
                dict(
                    disable_rht=not r,
                    disable_stochastic_rounding=not q,
                    disable_2d_quantization=not d,
                    row_scaled_activation=False,
                    nvfp4_4over6="none",
                    backward_override=None,
                ),
            ),
            _nvfp4(r, q, d),
        )
        for r in (True, False)
        for q in (True, False)
        for d in (True, False)
    ],
}


def _family(s: QuantSpec | None) -> str | None:
    """The TE recipe class a forward-input spec could belong to."""
    if s is None:
        return None
    if s.format == "fp4_e2m1" and s.scale_format == "ue4m3":
        return "NVFP4BlockScaling"
    if s.format != E4M3:
        return None
    if s.scaling == "delayed":
        return "DelayedScaling"
    if s.scaling == "tensor":
        return "Float8CurrentScaling"
    if s.scaling == "block" and s.scale_format == "e8m0":
        return "MXFP8BlockScaling"
    if s.scaling == "block" and s.scale_format == "fp32":
        return "Float8BlockScaling"
    return None


def _first_difference(recipe: Recipe, template: Recipe) -> str:
    for g, ops in GEMMS.items():
        for op in ops:
            a, b = recipe.spec(g, op), template.spec(g, op)
            if a == b:
                continue
            if a is None or b is None:
                return f"{g}.{op}: TE {'quantizes' if b else 'keeps in high precision'}"
            for f in fields(QuantSpec):
                va, vb = getattr(a, f.name), getattr(b, f.name)
                if va != vb:
                    return f"{g}.{op}.{f.name}: TE has {vb!r}, the recipe {va!r}"
        if recipe.gemm(g).accumulate != "fp32":
            return f"{g}.accumulate: TE accumulates in FP32"
    for f in fields(Recipe):
        if f.name not in (*GEMMS, "name", "description"):
            va, vb = getattr(recipe, f.name), getattr(template, f.name)
            if va != vb:
                return f"{f.name}: TE has {vb!r}, the recipe {va!r}"
    return "no difference found"


def _canonical(recipe: Recipe) -> Recipe:
    """Name and description dropped, every block-scale rounding spelled out (None means the
    scale format's standard rule), so equal numerics compare equal."""

    def spec(s: QuantSpec | None) -> QuantSpec | None:
        return s.replace(scale_rounding=s.block_scale_rounding) if s is not None else None

    gemms = {g: replace(recipe.gemm(g), a=spec(recipe.gemm(g).a), b=spec(recipe.gemm(g).b))
             for g in GEMMS}  # fmt: skip
    return replace(recipe, name="te", description="", **gemms)


def te_mapping(recipe: Recipe) -> TEMapping:
    """The TE recipe that computes `recipe`, or TEUnsupported with the reason."""
    s = recipe.output.a
    family = _family(s)
    if family is None:
        what = "nothing" if s is None else f"{s.fmt.name} with {s.scaling} scaling"
        if s is not None and s.scaling == "block":
            what += f" and {s.scale_format} scales"
        raise TEUnsupported(
            f"recipe {recipe.name!r}: TransformerEngine has no recipe that quantizes the "
            f"forward input as {what} (TE: DelayedScaling, Float8CurrentScaling, "
            f"Float8BlockScaling, MXFP8BlockScaling, NVFP4BlockScaling)"
        )
    candidates = TEMPLATES[family](s)
    named = _canonical(recipe)
    for mapping, template in candidates:
        if _canonical(template) == named:
            return mapping
    why = min((_first_difference(named, _canonical(t)) for _, t in candidates), key=len)
    raise TEUnsupported(f"recipe {recipe.name!r} differs from every TE {family}: {why}")
