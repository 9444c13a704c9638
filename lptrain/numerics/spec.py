"""`QuantSpec`: how one operand is quantized (format x scaling x rounding x transform).

Validated once at construction; inconsistent combinations raise ValueError naming the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from lptrain.numerics.formats import Format, get_format
from lptrain.numerics.rounding import ROUNDINGS

SCALINGS = ("none", "tensor", "delayed", "row", "block")
SCALE_FORMATS = ("fp32", "e8m0", "ue4m3", "ue5m3")
SCALE_ROUNDINGS = ("floor", "ceil")
AMAX_ALGOS = ("max", "most_recent")
SCALE_FROM = ("amax", "std")

# MSE-optimal clipping of the E2M1 grid for N(0, 1), in sigmas (algorithms.md §3.4, QuEST).
E2M1_GAUSSIAN_CLIP = 2.92247856


@dataclass(frozen=True)
class QuantSpec:
    """One operand's quantizer. Field names are public API.

    format: element format name or Format. scaling: none | tensor (current amax) | delayed
    (TE amax history) | row (one scale per slice along `axis`) | block (`block_size` elements
    along `axis`, or a (rows, cols) tile over the last two dims with `axis` last).
    scale_format: fp32 | e8m0 (OCP MX) | ue4m3 (NVFP4 two-level, with an FP32 tensor scale) |
    ue5m3 (two-level, Graphcore). scale_rounding: floor (OCP MX) | ceil, for power-of-two
    scales. pow2_scale: round FP32 scales down to a power of two. rounding: nearest |
    stochastic. hadamard: None or a block size for a Walsh-Hadamard rotation along `axis`;
    hadamard_signs: random sign flips (D.H). history_len / amax_algo / margin: delayed scaling
    (TE semantics). scale_target: two-level scales, the block-scale code a block whose max
    equals the tensor reference lands on (default: 448). amax_refresh: two-level scales, the
    tensor reference is refreshed every this many calls (UE5M3 sample-and-hold; 1 = current
    amax). scale_from: amax | std (Quartet/QuEST: the scale clips at `clip_sigmas` standard
    deviations of the block, power of two, floor). headroom: divide the encode scale by this
    (Quartet's backward uses 4/3 so stochastic rounding never clips).
    """

    format: str | Format = "fp8_e4m3"
    scaling: str = "tensor"
    block_size: int | tuple[int, int] | None = None
    scale_format: str = "fp32"
    scale_rounding: str = "floor"
    pow2_scale: bool = False
    rounding: str = "nearest"
    hadamard: int | None = None
    hadamard_signs: bool = False
    axis: int = -1
    history_len: int = 1024
    amax_algo: str = "max"
    margin: int = 0
    scale_target: float | None = None
    amax_refresh: int = 1
    scale_from: str = "amax"
    clip_sigmas: float = E2M1_GAUSSIAN_CLIP
    headroom: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.block_size, list):
            object.__setattr__(self, "block_size", tuple(self.block_size))
        for problem in _problems(self):
            raise ValueError(f"QuantSpec: {problem}")

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

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


def _problems(s: QuantSpec):
    try:
        fmt = get_format(s.format)
    except ValueError as e:
        yield f"format: {e}"
        return
    for name, value, allowed in (
        ("scaling", s.scaling, SCALINGS),
        ("scale_format", s.scale_format, SCALE_FORMATS),
        ("scale_rounding", s.scale_rounding, SCALE_ROUNDINGS),
        ("rounding", s.rounding, ROUNDINGS),
        ("amax_algo", s.amax_algo, AMAX_ALGOS),
        ("scale_from", s.scale_from, SCALE_FROM),
    ):
        if value not in allowed:
            yield f"{name}={value!r} is not one of {allowed}"
    if not fmt.signed:
        yield f"format={fmt.name!r} is unsigned: it is a scale format, not an element format"
    bs = s.block_size
    if s.scaling == "block":
        if bs is None:
            yield "scaling='block' needs block_size (an int or a (rows, cols) tile)"
        elif isinstance(bs, tuple):
            if len(bs) != 2 or not all(isinstance(b, int) and b > 0 for b in bs):
                yield f"block_size={bs!r}: a tile is two positive ints"
        elif not isinstance(bs, int) or bs <= 0:
            yield f"block_size={bs!r} must be a positive int or a (rows, cols) tile"
    elif bs is not None:
        yield f"block_size={bs!r} is only used with scaling='block' (scaling={s.scaling!r})"
    if s.scale_format != "fp32" and s.scaling not in ("block", "row"):
        yield (
            f"scale_format={s.scale_format!r} needs scaling='block' or 'row' "
            f"(scaling={s.scaling!r})"
        )
    if s.pow2_scale and s.scale_format != "fp32":
        yield f"pow2_scale applies to fp32 scales; scale_format={s.scale_format!r} fixes its own"
    if s.scale_from == "std" and (s.scale_format != "e8m0" or s.scaling != "block"):
        yield "scale_from='std' (Quartet/QuEST) needs scaling='block' and scale_format='e8m0'"
    if s.hadamard is not None and (not isinstance(s.hadamard, int) or not _is_pow2(s.hadamard)):
        yield f"hadamard={s.hadamard!r} must be None or a power of two (16, 32, 64, 128)"
    if s.hadamard_signs and s.hadamard is None:
        yield "hadamard_signs=True needs hadamard=<block size>"
    if s.scaling == "delayed" and s.history_len < 1:
        yield f"history_len={s.history_len} must be >= 1"
    if s.amax_refresh < 1:
        yield f"amax_refresh={s.amax_refresh} must be >= 1"
    if s.amax_refresh > 1 and not s.two_level:
        yield "amax_refresh > 1 (sample-and-hold) applies to two-level scale formats ue4m3/ue5m3"
    if s.headroom < 1.0:
        yield f"headroom={s.headroom} must be >= 1"
    if s.headroom != 1.0 and s.two_level:
        yield (
            f"headroom={s.headroom} is not defined for two-level scale_format="
            f"{s.scale_format!r} (use scale_target)"
        )
    if fmt.is_int and s.scale_format in ("ue4m3", "ue5m3"):
        yield (
            f"two-level scale_format={s.scale_format!r} is defined for FP4 elements, not {fmt.name}"
        )
