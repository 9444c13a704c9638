"""`quantize` = transform . scale . round . format, and the `QuantizedTensor` it returns.

One path for every spec (style principle 4):
  1. move `spec.axis` last (scales and blocks run along it), optionally rotate (Hadamard);
  2. group: tensor, row, 1-D blocks along the axis, or 2-D tiles over the last two dims;
  3. per group, an encode scale from the amax (or the std, for Quartet) in the spec's scale
     format (§2.1-2.8);
  4. round `x . enc` onto the element grid (saturating; nearest or stochastic);
  5. dequantize as `q . dec` (two-level: `(q . s_b) . S_dec`).
`fake_quantize` returns step 5 directly (what the emulated GEMMs consume); `quantize` also
encodes the codes. A test pins `quantize(...).dequantize() == fake_quantize(...)` bit for bit.

Non-finite inputs come out non-finite (algorithms.md §2.1): their scales follow the
reference rules (scaling.py), and saturating rounding no longer turns +-Inf into +-max: a
non-finite element becomes the format's own special value where it has one (E5M2: +-Inf and
NaN; E4M3FN: NaN); in formats without specials (FP6, FP4, integers) its whole scale group
decodes to NaN (the OCP MX rule). Either way it reaches the GEMM output rows and columns it
touches, as in FP32. Empty tensors quantize to empty tensors and leave any state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lptrain.numerics.codes import decode, encode, pack_nibbles, unpack_nibbles
from lptrain.numerics.formats import Format
from lptrain.numerics.hadamard import hadamard, random_signs
from lptrain.numerics.rounding import check_floating, round_to_format, work_dtype
from lptrain.numerics.scaling import spec_scales
from lptrain.numerics.spec import QuantSpec
from lptrain.numerics.state import ScalingState
from lptrain.numerics.stats import OPTIONAL, QuantStats, compute_stats


@dataclass
class _Core:
    q: torch.Tensor  # grid values, grouped view, work dtype
    dec: torch.Tensor | None  # per-group decode scale, broadcastable to q
    gdec: torch.Tensor | None  # two-level S_dec
    y: torch.Tensor  # x . enc before rounding (grouped view)
    xg: torch.Tensor  # input after rotation, grouped view
    moved_shape: torch.Size
    signs: torch.Tensor | None


def check_groups(last: tuple[int, ...], spec: QuantSpec, shape) -> None:
    """ValueError unless the scale groups of `spec` tile `last`, the axis-last shape (`shape`:
    the caller's, for the message). The kernels check it too: a partial group would get a
    scale silently computed over padding."""
    if spec.scaling != "block":
        return
    if spec.tile is None:
        if last[-1] % spec.block_size:
            raise ValueError(
                f"block_size {spec.block_size} does not divide axis {spec.axis} (length "
                f"{last[-1]}) of shape {tuple(shape)}"
            )
        return
    r, c = spec.tile
    if len(last) < 2 or last[-2] % r or last[-1] % c:
        raise ValueError(
            f"tile {spec.tile} does not divide the last two dims {tuple(last[-2:])} "
            f"(axis {spec.axis} last) of shape {tuple(shape)}"
        )


def _group(xt: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """View the axis-last tensor so that the amax of each group reduces over `dims`."""
    if spec.scaling != "block":
        return xt
    check_groups(tuple(xt.shape), spec, shape)
    if spec.tile is None:
        bs = spec.block_size
        return xt.reshape(*xt.shape[:-1], xt.shape[-1] // bs, bs)
    r, c = spec.tile
    return xt.reshape(*xt.shape[:-2], xt.shape[-2] // r, r, xt.shape[-1] // c, c)


def _core(
    x: torch.Tensor,
    spec: QuantSpec,
    state: ScalingState | None,
    update: bool,
    generator: torch.Generator | None,
    signs: torch.Tensor | None,
) -> _Core:
    check_floating(x)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if x.dim() == 0:
        x = x.reshape(1)
    axis = spec.axis % x.dim() if x.dim() else 0
    xt = x.movedim(axis, -1).to(work_dtype(x))
    if spec.hadamard is not None:
        if signs is None and spec.hadamard_signs:
            signs = random_signs(spec.hadamard, generator, device=x.device)
        xt = hadamard(xt, spec.hadamard, dim=-1, signs=signs)
    xg = _group(xt, spec, x.shape)
    fmt = spec.fmt
    if spec.scaling == "none" or xg.numel() == 0:
        dec = gdec = None
        y = xg
        bad = None if xg.numel() == 0 or bool(torch.isfinite(xg).all()) else ~torch.isfinite(xg)
    else:
        sc = spec_scales(xg, spec, state, update, x.dtype)
        dec, gdec, bad = sc.dec, sc.gdec, sc.bad
        y = xg * sc.enc
    q = round_to_format(y, fmt, spec.rounding, "saturate", generator)
    if bad is not None:
        q, dec = _nonfinite(xg, y, q, dec, bad, fmt)
    if state is not None and update and xg.numel():
        state.calls += 1
    return _Core(q, dec, gdec, y, xg, xt.shape, signs)


def _nonfinite(xg, y, q, dec, bad, fmt: Format):
    """Saturating rounding made +-Inf finite; give non-finite elements back their meaning."""
    special = ~torch.isfinite(xg)
    if fmt.has_inf:  # E5M2: +-Inf and NaN have codes of their own
        return torch.where(special, y, q), dec
    if fmt.nan != "none":  # E4M3FN: NaN only
        return torch.where(special, torch.full_like(q, float("nan")), q), dec
    # No specials (FP6, FP4, integers): the group's scale becomes NaN (OCP MX).
    q = torch.where(special, torch.zeros_like(q), q)
    base = dec if dec is not None else torch.ones((), dtype=q.dtype, device=q.device)
    return q, torch.where(bad, torch.full_like(base, float("nan")), base)


def _dequant(q: torch.Tensor, dec, gdec, *, own_q: bool = False) -> torch.Tensor:
    """(q . dec) . gdec; `own_q`: q is not needed afterwards and is scaled in place (a fresh
    tensor per multiply cost more in page faults than the multiply)."""
    if dec is None and gdec is None:
        return q
    out = q if own_q else q.clone()
    if dec is not None:
        out = out.mul_(dec)
    return out if gdec is None else out.mul_(gdec)


def _restore(t: torch.Tensor, moved_shape, axis: int, ndim: int) -> torch.Tensor:
    return t.reshape(moved_shape).movedim(-1, axis % ndim)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    state: ScalingState | None = None,
    update: bool = True,
    generator: torch.Generator | None = None,
    signs: torch.Tensor | None = None,
    with_mask: bool = False,
    with_stats: bool = False,
    wanted=OPTIONAL,
):
    """Quantize-dequantize `x` per `spec`, in float32 (float64 for float64 inputs).

    With a Hadamard the result stays in the rotated domain (the rotation cancels in the GEMM,
    §3.2). Returns the tensor, or (tensor, extras) where extras has 'mask' (|x . enc| below the
    format max: the trust mask of QuEST/Quartet), 'stats' (QuantStats of the opt-in statistics
    in `wanted`, `compute_stats`) and 'signs'.
    `state` carries delayed-scaling history / sample-and-hold references between calls;
    `update=False` uses it without recording anything (evaluation, recomputed forwards).
    """
    c = _core(x, spec, state, update, generator, signs)
    xh = _dequant(c.q, c.dec, c.gdec, own_q=not with_stats)
    out = _restore(xh, c.moved_shape, spec.axis, max(x.dim(), 1)).reshape(x.shape)
    if not (with_mask or with_stats):
        return out
    extras = {"signs": c.signs}
    if with_mask:
        m = c.y.abs() < spec.fmt.max_finite
        extras["mask"] = _restore(m, c.moved_shape, spec.axis, max(x.dim(), 1)).reshape(x.shape)
    if with_stats:
        extras["stats"] = compute_stats(c.xg, c.y, c.q, xh, c.dec, c.gdec, spec, wanted)
    return out, extras


@dataclass
class QuantizedTensor:
    """Element codes + scales + spec. Codes are laid out with `spec.axis` last (as scaled).

    FP8 codes are torch float8 tensors, 4-bit codes are packed two per byte (uint8), other
    sub-byte floats are one uint8 code each, integers are int8/int16. `scales` holds the decode
    scale per group (FP32 values of the scale format), `global_scale` the two-level S_dec.
    """

    codes: torch.Tensor
    scales: torch.Tensor | None
    global_scale: torch.Tensor | None
    spec: QuantSpec
    shape: torch.Size
    grouped_shape: torch.Size
    moved_shape: torch.Size
    packed: bool
    signs: torch.Tensor | None = None
    stats: QuantStats | None = None
    out_dtype: torch.dtype = torch.float32

    def values(self) -> torch.Tensor:
        """Element grid values (unscaled) in the grouped layout."""
        fmt = self.spec.fmt
        codes = unpack_nibbles(self.codes) if self.packed else self.codes
        if codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            v = codes.to(torch.float32)
        else:
            v = decode(codes, fmt)
        return v.reshape(self.grouped_shape).to(self.out_dtype)

    def dequantize(self) -> torch.Tensor:
        """The fake-quantized tensor, in float32 (float64 for float64 inputs), rotated domain."""
        xh = _dequant(self.values(), self.scales, self.global_scale, own_q=True)
        return _restore(xh, self.moved_shape, self.spec.axis, max(len(self.shape), 1)).reshape(
            self.shape
        )


def _encode_codes(q: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, bool]:
    if fmt.torch_dtype is not None and fmt.torch_dtype.is_floating_point:
        return q.to(torch.float32).to(fmt.torch_dtype), False
    codes = encode(q, fmt)
    if fmt.is_int:
        return codes.to(torch.int16 if fmt.bits > 8 else torch.int8), False
    if fmt.bits == 4 and q.shape[-1] % 2 == 0:
        return pack_nibbles(codes.to(torch.uint8)), True
    return codes.to(torch.uint8), False


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    state: ScalingState | None = None,
    update: bool = True,
    generator: torch.Generator | None = None,
    signs: torch.Tensor | None = None,
    with_stats: bool = False,
) -> QuantizedTensor:
    """Quantize `x` per `spec` into codes and scales (see module docstring for the steps).

    `state` carries delayed-scaling history / sample-and-hold references between calls
    (`update=False`: use it, record nothing); `generator` drives stochastic rounding and random
    Hadamard signs; `signs` forces a sign vector (both operands of a GEMM must share it).
    """
    c = _core(x, spec, state, update, generator, signs)
    codes, packed = _encode_codes(c.q, spec.fmt)
    stats = None
    if with_stats:
        xh = _dequant(c.q, c.dec, c.gdec, own_q=False)
        stats = compute_stats(c.xg, c.y, c.q, xh, c.dec, c.gdec, spec)
    return QuantizedTensor(
        codes=codes,
        scales=c.dec,
        global_scale=c.gdec,
        spec=spec,
        shape=x.shape,
        grouped_shape=c.q.shape,
        moved_shape=c.moved_shape,
        packed=packed,
        signs=c.signs,
        stats=stats,
        out_dtype=c.q.dtype,
    )
