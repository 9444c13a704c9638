"""Block-scaled quantize: reference lptrain.numerics.fake_quantize / quantize with
QuantSpec(scaling='block'): 1-D blocks along the reduction axis or square/rectangular 2-D tiles,
with FP32 (optionally power-of-two), E8M0 (OCP MX, floor or ceil rule) or two-level UE4M3 /
UE5M3 (NVFP4, Graphcore) block scales; FP8/FP6/FP4/INT8 elements, FP4 packed two per byte;
optional block Hadamard (with signs) and stochastic rounding fused in.

One pass computes each block's amax, its scale and its codes. Two-level scales first need the
tensor amax (of the rotated operand when there is a rotation): one extra read (kernels/amax.py),
as in TransformerEngine. Quartet's std-based scales (scale_from='std') are computed by torch on
the rotated operand (the reference's own functions); the kernel then scales, rounds and encodes.
"""

from __future__ import annotations

import torch

from lptrain.kernels.amax import amax_2d
from lptrain.kernels.launch import BLOCK_MODES, GIVEN_MODE, KernelResult, launch
from lptrain.numerics import QuantSpec, get_format, hadamard
from lptrain.numerics import scaling as S
from lptrain.numerics.hadamard import check_divides
from lptrain.numerics.quantize import check_groups
from lptrain.numerics.scaling import FLT_MAX


def group_of(spec: QuantSpec) -> tuple[int, int]:
    """(rows, cols) of one scale group in the (rows, reduction) operand."""
    return spec.tile if spec.tile is not None else (1, spec.block_size)


def two_level_params(ref: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[S_enc / fmt_max, S_dec] from the tensor reference, with the reference's operation
    order (global_enc, then `s_enc * (1 / fmt_max)` and `1 / s_enc`)."""
    target = spec.scale_target if spec.scale_target is not None else 448.0
    s_enc = S.global_enc(ref, target, spec.fmt.max_finite)
    per_unit = s_enc * torch.tensor(
        1.0 / spec.fmt.max_finite, dtype=torch.float32, device=s_enc.device
    )
    return torch.stack([per_unit, 1.0 / s_enc]).reshape(2)


def _std_scales(xt: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quartet/QuEST per-block (enc, dec) of the rotated operand, by the reference's functions."""
    gr, gc = group_of(spec)
    R, C = xt.shape
    xg = xt.reshape(R // gr, gr, C // gc, gc)
    std = xg.std(dim=(1, 3), correction=0)
    exp = S.std_exponent(std, spec.fmt, spec.clip_sigmas)
    enc, dec = torch.exp2(-exp), torch.exp2(exp)
    if spec.headroom != 1.0:
        enc, dec = enc / spec.headroom, dec * spec.headroom
    return enc.contiguous(), dec.contiguous()


def quantize_block(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    signs: torch.Tensor | None = None,
    seed: int | None = None,
    tensor_ref: torch.Tensor | None = None,
    codes: bool = True,
    dense: torch.dtype | None = None,
    dense_global: bool = True,
    mask: bool = False,
) -> KernelResult:
    """Block-quantize a 2-D operand (R, C) along C; R and C multiples of the group (pad first).

    signs: the rotation's sign vector (spec.hadamard_signs). seed: stochastic rounding's Philox
    key (required when spec.rounding is 'stochastic'). tensor_ref: two-level scales' tensor
    reference when the caller holds one (sample-and-hold state); default: the current amax
    (abs_max: NaN/Inf when the operand holds one, which the reference's global_enc maps to 1).
    dense: also write the dequantized values in this dtype (with the two-level tensor scale
    when dense_global, else only the block scales). Returns codes, per-group decode scales (and
    the two-level S_dec), dense values, trust mask as asked."""
    fmt = spec.fmt
    if spec.rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed")
    # The reference's refusals: the grid would cover a partial group or rotation block.
    if spec.hadamard:
        check_divides(tuple(x.shape), 1, spec.hadamard)
    check_groups(tuple(x.shape), spec, x.shape)
    seed = seed if spec.rounding == "stochastic" else None
    group = group_of(spec)
    kw = dict(group=group, seed=seed, codes=codes, dense=dense, mask=mask, scales=True)
    if spec.scale_from == "std":
        xt = x.to(torch.float32)
        if spec.hadamard:
            xt = hadamard(xt, spec.hadamard, dim=-1, signs=signs)
        if xt.numel():
            enc, dec = _std_scales(xt, spec)
        else:
            enc = dec = torch.empty(0, device=x.device)
        return launch(xt, fmt, GIVEN_MODE, enc=enc, dec=dec, **kw)
    kw.update(hadamard=spec.hadamard, signs=signs if spec.hadamard else None)
    mode = BLOCK_MODES[spec.scale_format]
    if spec.two_level:
        if tensor_ref is None:
            tensor_ref = amax_2d(x, hadamard=spec.hadamard, signs=kw["signs"]).tensor
        params = two_level_params(tensor_ref, spec)
        sfmt = get_format(spec.scale_format)
        out = launch(
            x,
            fmt,
            mode,
            enc=params,
            dense_global=dense_global,
            S_MBITS=sfmt.mbits,
            S_EMIN=sfmt.emin,
            S_MAXF=float(sfmt.max_finite),
            S_MIN_NORMAL=float(sfmt.min_normal),
            ZERO_GUARD=spec.scale_format == "ue5m3",
            SCALE_CEIL=spec.block_scale_rounding == "ceil",
            **kw,
        )
        out.global_scale = params[1]
        return out
    in_max = torch.finfo(x.dtype).max if x.dtype != torch.float64 else FLT_MAX
    return launch(
        x,
        fmt,
        mode,
        POW2=spec.pow2_scale,
        HEADROOM=float(spec.headroom),
        IN_MAX=float(in_max),
        E8M0_CEIL=spec.block_scale_rounding == "ceil",
        EMAX_ELEM=fmt.emax,
        **kw,
    )
