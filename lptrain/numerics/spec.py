"""`QuantSpec`: how one operand is quantized (format x scaling x rounding x transform).

Validated once at construction: a wrong type, an unknown choice, an inconsistent combination or
a field that means nothing for the chosen format/scaling (e.g. `scale_target` with E8M0 scales)
raises `SpecError`, an `lptrain.ConfigError` whose message starts with the field name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from lptrain.errors import ConfigError
from lptrain.numerics.formats import Format, get_format
from lptrain.numerics.rounding import ROUNDINGS

SCALINGS = ("none", "tensor", "delayed", "row", "block")
SCALE_FORMATS = ("fp32", "e8m0", "ue4m3", "ue5m3")
# Block-scale rounding per scale format (the first is the default, used when None):
# E8M0 floor = OCP MX (may clip the block max), ceil = TE's MXFP8 kernel (never clips);
# two-level nearest = TE NVFP4 (RNE of the E4M3/UE5M3 scale: may clip), ceil (never clips).
SCALE_ROUNDINGS = {
    "e8m0": ("floor", "ceil"),
    "ue4m3": ("nearest", "ceil"),
    "ue5m3": ("nearest", "ceil"),
}
DELAYED_INITS = ("one", "current")
AMAX_ALGOS = ("max", "most_recent")
SCALE_FROM = ("amax", "std")

# MSE-optimal clipping of the E2M1 grid for N(0, 1), in sigmas (algorithms.md §3.4, QuEST).
E2M1_GAUSSIAN_CLIP = 2.92247856


class SpecError(ConfigError):
    """A QuantSpec field is wrong; `field` names it, the message starts with it."""


@dataclass(frozen=True)
class QuantSpec:
    """One operand's quantizer. Field names are public API.

    format: element format name or Format. scaling: none | tensor (current amax) | delayed
    (TE amax history) | row (one scale per slice along `axis`) | block (`block_size` elements
    along `axis`, or a (rows, cols) tile over the last two dims with `axis` last).
    scale_format: fp32 | e8m0 (OCP MX) | ue4m3 (NVFP4 two-level, with an FP32 tensor scale) |
    ue5m3 (two-level, Graphcore). scale_rounding: how block scales round, None = the format's
    standard (E8M0: floor (OCP) | ceil; ue4m3/ue5m3: nearest (TE) | ceil, which never clips a
    block max). pow2_scale: round FP32 scales down to a power of two. rounding: nearest |
    stochastic. hadamard: None or a block size for a Walsh-Hadamard rotation along `axis`;
    hadamard_signs: random sign flips (D.H). history_len / amax_algo / margin: delayed scaling
    (TE semantics); delayed_init: one (TE: the first call uses scale 1) | current (calls before
    the history holds an amax use current scaling, algorithms.md §2.2). scale_target:
    two-level scales, the block-scale code a block whose max equals the tensor reference
    lands on (default: 448). amax_refresh: two-level scales, the
    tensor reference is refreshed every this many calls (UE5M3 sample-and-hold; 1 = current
    amax). scale_from: amax | std (Quartet/QuEST: the scale clips at `clip_sigmas` standard
    deviations of the block, power of two, floor). headroom: divide the encode scale by this
    (Quartet's backward uses 4/3 so stochastic rounding never clips).
    """

    format: str | Format = "fp8_e4m3"
    scaling: str = "tensor"
    block_size: int | tuple[int, int] | None = None
    scale_format: str = "fp32"
    scale_rounding: str | None = None
    pow2_scale: bool = False
    rounding: str = "nearest"
    hadamard: int | None = None
    hadamard_signs: bool = False
    axis: int = -1
    history_len: int = 1024
    amax_algo: str = "max"
    margin: int = 0
    delayed_init: str = "one"
    scale_target: float | None = None
    amax_refresh: int = 1
    scale_from: str = "amax"
    clip_sigmas: float = E2M1_GAUSSIAN_CLIP
    headroom: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.block_size, list):
            object.__setattr__(self, "block_size", tuple(self.block_size))
        for field_name, problem in _problems(self):
            raise SpecError(field_name, problem)

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def block_scale_rounding(self) -> str | None:
        """scale_rounding with the scale format's default filled in."""
        choices = SCALE_ROUNDINGS.get(self.scale_format)
        if choices is None:
            return None
        return self.scale_rounding or choices[0]

    @property
    def two_level(self) -> bool:
        return self.scale_format in ("ue4m3", "ue5m3")

    @property
    def tile(self) -> tuple[int, int] | None:
        return self.block_size if isinstance(self.block_size, tuple) else None

    def replace(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Format):
                v = v.name
            if isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Field -> accepted Python types (bool is not an int here: `history_len: true` is a mistake).
_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str, Format),
    "scaling": (str,),
    "block_size": (int, tuple, type(None)),
    "scale_format": (str,),
    "scale_rounding": (str, type(None)),
    "pow2_scale": (bool,),
    "rounding": (str,),
    "hadamard": (int, type(None)),
    "hadamard_signs": (bool,),
    "axis": (int,),
    "history_len": (int,),
    "amax_algo": (str,),
    "margin": (int,),
    "delayed_init": (str,),
    "scale_target": (int, float, type(None)),
    "amax_refresh": (int,),
    "scale_from": (str,),
    "clip_sigmas": (int, float),
    "headroom": (int, float),
}


def _type_problems(s: QuantSpec):
    for f in fields(s):
        v = getattr(s, f.name)
        ok = isinstance(v, _TYPES[f.name]) and not (
            isinstance(v, bool) and bool not in _TYPES[f.name]
        )
        if not ok:
            want = " or ".join("null" if t is type(None) else t.__name__ for t in _TYPES[f.name])
            yield f.name, f"expected {want}, got {type(v).__name__} {v!r}"


def _changed(s: QuantSpec, name: str) -> bool:
    return getattr(s, name) != _DEFAULTS[name]


def _problems(s: QuantSpec):
    """(field, problem) pairs, the first one is raised."""
    yield from _type_problems(s)
    try:
        fmt = get_format(s.format)
    except ValueError as e:
        yield "format", str(e)
        return
    for name, value, allowed in (
        ("scaling", s.scaling, SCALINGS),
        ("scale_format", s.scale_format, SCALE_FORMATS),
        ("rounding", s.rounding, ROUNDINGS),
        ("amax_algo", s.amax_algo, AMAX_ALGOS),
        ("scale_from", s.scale_from, SCALE_FROM),
        ("delayed_init", s.delayed_init, DELAYED_INITS),
    ):
        if value not in allowed:
            yield name, f"{value!r} is not one of {allowed}"
    if not fmt.signed:
        yield "format", f"{fmt.name!r} is unsigned: it is a scale format, not an element format"
    yield from _block_problems(s)
    yield from _scale_problems(s, fmt)
    yield from _meaningless(s)
    if s.hadamard is not None and not _is_pow2(s.hadamard):
        yield "hadamard", f"{s.hadamard!r} must be None or a power of two (16, 32, 64, 128)"
    if s.hadamard_signs and s.hadamard is None:
        yield "hadamard_signs", "True needs hadamard=<block size>"
    if s.scaling == "delayed" and s.history_len < 1:
        yield "history_len", f"{s.history_len} must be >= 1"
    if s.amax_refresh < 1:
        yield "amax_refresh", f"{s.amax_refresh} must be >= 1"
    if s.headroom < 1.0:
        yield "headroom", f"{s.headroom} must be >= 1"


def _block_problems(s: QuantSpec):
    bs = s.block_size
    if s.scaling == "block":
        if bs is None:
            yield "block_size", "scaling='block' needs block_size (an int or a (rows, cols) tile)"
        elif isinstance(bs, tuple):
            if len(bs) != 2 or not all(isinstance(b, int) and b > 0 for b in bs):
                yield "block_size", f"{bs!r}: a tile is two positive ints"
        elif bs <= 0:
            yield "block_size", f"{bs!r} must be a positive int or a (rows, cols) tile"
    elif bs is not None:
        yield "block_size", f"{bs!r} is only used with scaling='block' (scaling={s.scaling!r})"


def _scale_problems(s: QuantSpec, fmt: Format):
    if s.scale_format != "fp32" and s.scaling not in ("block", "row"):
        yield (
            "scale_format",
            f"{s.scale_format!r} needs scaling='block' or 'row' (scaling={s.scaling!r})",
        )
    if s.pow2_scale and (s.scale_format != "fp32" or s.scaling in ("none", "delayed")):
        yield (
            "pow2_scale",
            (
                f"applies to fp32 current scales (scaling tensor, row or block); here "
                f"scale_format={s.scale_format!r}, scaling={s.scaling!r}"
            ),
        )
    choices = SCALE_ROUNDINGS.get(s.scale_format)
    if s.scale_rounding is not None:
        if choices is None:
            yield (
                "scale_rounding",
                (
                    f"{s.scale_rounding!r} means nothing for scale_format={s.scale_format!r} "
                    f"(it applies to {sorted(SCALE_ROUNDINGS)} block scales)"
                ),
            )
        elif s.scale_rounding not in choices:
            yield (
                "scale_rounding",
                (
                    f"{s.scale_rounding!r} is not one of {choices} "
                    f"for scale_format={s.scale_format!r}"
                ),
            )
    if s.scale_from == "std" and (s.scale_format != "e8m0" or s.scaling != "block"):
        yield "scale_from", "'std' (Quartet/QuEST) needs scaling='block' and scale_format='e8m0'"
    if s.amax_refresh > 1 and not s.two_level:
        yield "amax_refresh", "> 1 (sample-and-hold) applies to two-level scale formats ue4m3/ue5m3"
    if s.headroom != 1.0 and s.two_level:
        yield (
            "headroom",
            (
                f"{s.headroom} is not defined for two-level scale_format={s.scale_format!r} "
                f"(use scale_target)"
            ),
        )
    if fmt.is_int and s.two_level:
        yield (
            "scale_format",
            f"two-level {s.scale_format!r} is defined for FP4 elements, not {fmt.name}",
        )


def _meaningless(s: QuantSpec):
    """Fields set away from their default where they cannot act: refused, never ignored."""
    if s.scaling != "delayed":
        for name in ("history_len", "amax_algo", "margin", "delayed_init"):
            if _changed(s, name):
                yield name, f"applies to scaling='delayed' only (scaling={s.scaling!r})"
    if _changed(s, "scale_target") and not s.two_level:
        yield (
            "scale_target",
            (
                "applies to two-level scale formats ue4m3/ue5m3 only "
                f"(scale_format={s.scale_format!r})"
            ),
        )
    if _changed(s, "clip_sigmas") and s.scale_from != "std":
        yield "clip_sigmas", "applies to scale_from='std' only"
    if _changed(s, "headroom") and s.scaling == "none":
        yield "headroom", "scaling='none' has no scale to divide"


_DEFAULTS = {f.name: f.default for f in fields(QuantSpec)}
