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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lptrain.numerics import scaling as S
from lptrain.numerics.codes import decode, encode, pack_nibbles, unpack_nibbles
from lptrain.numerics.formats import Format
from lptrain.numerics.hadamard import hadamard, random_signs
from lptrain.numerics.rounding import check_floating, round_to_format, work_dtype
from lptrain.numerics.spec import QuantSpec
from lptrain.numerics.state import ScalingState


@dataclass
class QuantStats:
    """Per-call statistics (algorithms.md §8.3), as 0-dim tensors (no host sync)."""

    amax: torch.Tensor
    scale: torch.Tensor  # dec: one per group (scalar for tensor scaling)
    saturated: torch.Tensor  # fraction of elements with |x . enc| > max finite
    underflow: torch.Tensor  # fraction of non-zero inputs that quantize to zero
    sqnr_db: torch.Tensor  # 10 log10(|x|^2 / |x - x_hat|^2), in the rotated domain

    def as_dict(self) -> dict[str, float]:
        return {
            "amax": float(self.amax),
            "scale_mean": float(self.scale.float().mean()),
            "saturated": float(self.saturated),
            "underflow": float(self.underflow),
            "sqnr_db": float(self.sqnr_db),
        }


@dataclass
class _Core:
    q: torch.Tensor  # grid values, grouped view, work dtype
    dec: torch.Tensor | None  # per-group decode scale, broadcastable to q
    gdec: torch.Tensor | None  # two-level S_dec
    y: torch.Tensor  # x . enc before rounding (grouped view)
    xg: torch.Tensor  # input after rotation, grouped view
    moved_shape: torch.Size
    signs: torch.Tensor | None


def _group(xt: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """View the axis-last tensor so that the amax of each group reduces over `dims`."""
    if spec.scaling != "block":
        return xt
    tile = spec.tile
    if tile is None:
        bs = spec.block_size
        if xt.shape[-1] % bs:
            raise ValueError(
                f"block_size {bs} does not divide axis {spec.axis} (length {xt.shape[-1]}) "
                f"of shape {tuple(shape)}"
            )
        return xt.reshape(*xt.shape[:-1], xt.shape[-1] // bs, bs)
    r, c = tile
    if xt.dim() < 2 or xt.shape[-2] % r or xt.shape[-1] % c:
        raise ValueError(
            f"tile {tile} does not divide the last two dims {tuple(xt.shape[-2:])} "
            f"(axis {spec.axis} last) of shape {tuple(shape)}"
        )
    return xt.reshape(*xt.shape[:-2], xt.shape[-2] // r, r, xt.shape[-1] // c, c)


def _group_dims(spec: QuantSpec) -> tuple[int, ...]:
    if spec.scaling == "block" and spec.tile is not None:
        return (-3, -1)
    return (-1,)


def _tensor_ref(
    amax_t: torch.Tensor, spec: QuantSpec, state: ScalingState | None, update: bool
) -> torch.Tensor:
    """Two-level tensor reference: current amax, or sample-and-hold every amax_refresh calls."""
    if spec.amax_refresh == 1 or state is None:
        return amax_t
    refresh = (state.calls % spec.amax_refresh == 0) | (state.ref == 0)
    ref = torch.where(refresh, amax_t, state.ref)
    if update:
        state.ref.copy_(ref)
    return ref


def _delayed(amax: torch.Tensor, spec: QuantSpec, state: ScalingState, update: bool):
    """Use the scale from the previous update, then record amax and update (TE, §2.2)."""
    enc = state.scale.clone()
    if not update:
        return enc
    h = state.amax_history
    if bool(torch.isfinite(amax)):  # a NaN/Inf amax would freeze a 'max' history for L steps
        h[0] = amax
    new = S.delayed_enc(h, state.scale, spec.fmt.max_finite, spec.amax_algo, spec.margin)
    state.scale.copy_(new)
    state.amax_history.copy_(torch.roll(h, -1))
    state.amax_history[0] = 0.0
    return enc


def _scales(
    xg: torch.Tensor,
    spec: QuantSpec,
    state: ScalingState | None,
    update: bool,
    in_dtype: torch.dtype,
):
    """(enc, dec, global_dec) for the grouped tensor, broadcastable to it."""
    fmt: Format = spec.fmt
    dims = _group_dims(spec)
    if spec.scaling in ("tensor", "delayed"):
        amax = S.abs_max(xg)
        if state is not None and update:
            amax = state.reduce(amax)
        if spec.scaling == "delayed":
            if state is None:
                raise ValueError("scaling='delayed' needs a ScalingState (state=...)")
            enc = _delayed(amax, spec, state, update)
        else:
            enc = S.current_enc(amax, fmt.max_finite, in_dtype, spec.pow2_scale)
        enc = enc / spec.headroom
        return enc, 1.0 / enc, None
    if spec.scale_from == "std":
        stat = xg.to(torch.float32).std(dim=dims, keepdim=True, correction=0)
    else:
        stat = S.abs_max(xg, dims)
    if spec.scale_format == "fp32":
        enc = S.current_enc(stat, fmt.max_finite, in_dtype, spec.pow2_scale) / spec.headroom
        return enc, 1.0 / enc, None
    if spec.scale_format == "e8m0":
        if spec.scale_from == "std":
            exp = S.std_exponent(stat, fmt, spec.clip_sigmas)
        else:
            exp = S.e8m0_exponent(stat, fmt, spec.scale_rounding)
        dec = torch.exp2(exp)
        enc = torch.exp2(-exp)
        if spec.headroom != 1.0:
            enc, dec = enc / spec.headroom, dec * spec.headroom
        return enc, dec, None
    # Two-level (NVFP4 / UE5M3): FP32 tensor scale x low-precision block scales.
    amax_t = S.abs_max(xg)
    if state is not None and update:
        amax_t = state.reduce(amax_t)
    ref = _tensor_ref(amax_t, spec, state, update)
    target = spec.scale_target if spec.scale_target is not None else 448.0
    s_enc = S.global_enc(ref, target, fmt.max_finite)
    s_b, enc = S.two_level_block_scales(stat, s_enc, fmt, spec.scale_format)
    return enc, s_b, 1.0 / s_enc


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
    if spec.scaling == "none":
        enc = dec = gdec = None
        y = xg
    else:
        enc, dec, gdec = _scales(xg, spec, state, update, x.dtype)
        y = xg * enc
    q = round_to_format(y, fmt, spec.rounding, "saturate", generator)
    if state is not None and update:
        state.calls += 1
    return _Core(q, dec, gdec, y, xg, xt.shape, signs)


def _dequant(q: torch.Tensor, dec, gdec) -> torch.Tensor:
    out = q if dec is None else q * dec
    return out if gdec is None else out * gdec


def _stats(c: _Core, fmt: Format, x_hat_g: torch.Tensor) -> QuantStats:
    x = c.xg
    nz = x != 0
    # Norms in the working precision (torch sums in cascade: relative error ~1e-6, i.e.
    # ~1e-5 dB) instead of float64 copies: statistics must stay cheap enough for training.
    err = torch.linalg.vector_norm(x - x_hat_g).double().square()
    sig = torch.linalg.vector_norm(x).double().square()
    sqnr = 10 * torch.log10(sig / err) if float(err) > 0 else torch.tensor(float("inf"))
    scale = c.dec if c.dec is not None else torch.ones(())
    if c.gdec is not None:
        scale = scale * c.gdec
    return QuantStats(
        amax=S.abs_max(x),
        scale=scale.detach().reshape(-1) if scale.dim() else scale,
        saturated=(c.y.abs() > fmt.max_finite).float().mean(),
        underflow=(nz & (c.q == 0)).sum() / nz.sum().clamp(min=1),
        sqnr_db=sqnr.float(),
    )


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
):
    """Quantize-dequantize `x` per `spec`, in float32 (float64 for float64 inputs).

    With a Hadamard the result stays in the rotated domain (the rotation cancels in the GEMM,
    §3.2). Returns the tensor, or (tensor, extras) where extras has 'mask' (|x . enc| below the
    format max: the trust mask of QuEST/Quartet), 'stats' (QuantStats) and 'signs'.
    `state` carries delayed-scaling history / sample-and-hold references between calls;
    `update=False` uses it without recording anything (evaluation, recomputed forwards).
    """
    c = _core(x, spec, state, update, generator, signs)
    xh = _dequant(c.q, c.dec, c.gdec)
    out = _restore(xh, c.moved_shape, spec.axis, max(x.dim(), 1)).reshape(x.shape)
    if not (with_mask or with_stats):
        return out
    extras = {"signs": c.signs}
    if with_mask:
        m = c.y.abs() < spec.fmt.max_finite
        extras["mask"] = _restore(m, c.moved_shape, spec.axis, max(x.dim(), 1)).reshape(x.shape)
    if with_stats:
        extras["stats"] = _stats(c, spec.fmt, xh)
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
        xh = _dequant(self.values(), self.scales, self.global_scale)
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
    stats = _stats(c, spec.fmt, _dequant(c.q, c.dec, c.gdec)) if with_stats else None
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
