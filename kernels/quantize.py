"""The fused quantize kernel: reference lptrain.numerics.quantize / fake_quantize of a 2-D
operand (rows, reduction) along its last axis, one pass over the operand.

One program quantizes a [BR, BC] tile: load (any strides), optional signs + block Hadamard,
scales, scale, round (RNE, or stochastic with counter-based Philox bits), encode, and store
what the caller asks for: codes (FP4 packed two per byte), a transposed copy of the codes, a
column-wise copy (rowwise scaling: each column scaled on its own, written transposed), the
dequantized values, the trust mask, per-group decode scales, the tile's finite amax.

Scale modes (what `enc`/`dec` the elements get), each the twin of a branch of the reference's
`_scales`:
  TENSOR      one scale, read from memory (computed by torch from the amax kernel's result)
  ROW         one scale per row (and per column for the column-wise copy), read from memory
  BLOCK_FP32  per 1-D block / 2-D tile: current_enc (optionally a power of two), in-kernel
  BLOCK_E8M0  per block: the OCP MX shared exponent (floor or ceil rule), in-kernel
  BLOCK_2LVL  per block: NVFP4 / UE5M3 block scale under a tensor scale, in-kernel
  BLOCK_GIVEN per block: read from memory (Quartet's std-based scales, computed by torch)

Non-finite inputs follow the reference (lptrain.numerics.quantize `_nonfinite`, scaling.py):
a group's amax is NaN/Inf when it holds one, and each scale rule treats that amax as the
reference does (current/FP32: enc 1; E8M0: a NaN block; two-level: the clamped, rounded scale
of an Inf or NaN amax); a NaN/Inf element then becomes its format's own special value where the
format has one (E5M2 keeps x . enc: +-Inf or NaN; E4M3FN gets NaN), and in formats without one
(NAN_GROUPS: FP6, FP4, integers) its code is 0 and its whole scale group decodes to NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lptrain.kernels._core import encode_grid, exp2i, hadamard_rows, is_finite, log2_parts
from lptrain.kernels._core import round_grid as _round

TENSOR, ROW, BLOCK_FP32, BLOCK_E8M0, BLOCK_2LVL, BLOCK_GIVEN = range(6)
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a constexpr: jit code may read it


@triton.jit
def _group_max(v, BR: tl.constexpr, BC: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr):
    t = tl.reshape(v, (BR // GR, GR, BC // GC, GC))
    return tl.max(tl.max(t, axis=3), axis=1)


@triton.jit
def _expand(g, BR: tl.constexpr, BC: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr):
    t = tl.broadcast_to(g[:, None, :, None], (BR // GR, GR, BC // GC, GC))
    return tl.reshape(t, (BR, BC))


@triton.jit
def _finish(q, x_fin, y, NAN_GROUPS: tl.constexpr, HAS_INF: tl.constexpr):
    """A non-finite element: its format's special value, or code 0 in a NaN group (the twin of
    the reference's `_nonfinite`)."""
    if NAN_GROUPS:
        return tl.where(x_fin, q, 0.0)
    special = y if HAS_INF else float("nan")
    return tl.where(x_fin, q, special)


@triton.jit
def _ref_max(a_fin, code):
    """abs_max's value from the finite max and the non-finite code (0, 1: Inf, 2: NaN)."""
    return tl.where(code > 0, tl.where(code > 1.5, float("nan"), float("inf")), a_fin)


@triton.jit
def _block_scales(g, bad, enc_ptr, dec_ptr, gidx, gmask, MODE: tl.constexpr,
                  MAXF: tl.constexpr, IN_MAX: tl.constexpr, POW2: tl.constexpr,
                  HEADROOM: tl.constexpr, E8M0_CEIL: tl.constexpr, EMAX_ELEM: tl.constexpr,
                  S_MBITS: tl.constexpr, S_EMIN: tl.constexpr, S_MAXF: tl.constexpr,
                  S_MIN_NORMAL: tl.constexpr, ZERO_GUARD: tl.constexpr,
                  SCALE_CEIL: tl.constexpr, NAN_GROUPS: tl.constexpr):  # fmt: skip
    """(enc, dec) per group from its finite amax g; the twins of lptrain.numerics.scaling's
    current_enc, e8m0_exponent and two_level_block_scales (same FP32 operation order)."""
    if MODE == 2:  # BLOCK_FP32
        enc = tl.math.div_rn(tl.full(g.shape, MAXF, tl.float32), g)
        enc = tl.where(enc == float("inf"), IN_MAX, enc)
        enc = tl.where((g == 0) | bad, 1.0, enc)  # zero or non-finite amax: 1
        if POW2:
            enc = (enc.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        if HEADROOM != 1.0:
            enc = tl.math.div_rn(enc, tl.full(g.shape, HEADROOM, tl.float32))
        dec = tl.math.div_rn(tl.full(g.shape, 1.0, tl.float32), enc)
    elif MODE == 3:  # BLOCK_E8M0
        if E8M0_CEIL:
            qv = tl.math.div_rn(g, tl.full(g.shape, MAXF, tl.float32))
            fl, p2 = log2_parts(qv)
            ex = fl + tl.where(p2, 0, 1)
            ex = tl.where(qv == 0, 0, ex)  # the reference's frexp(0) = (0, 0)
        else:
            fl, p2 = log2_parts(g)
            ex = fl - EMAX_ELEM
        ex = tl.maximum(ex, -127)
        ex = tl.where(g == 0, -127, ex)
        nan = (ex > 127) | bad  # an Inf/NaN amax: the whole block decodes to NaN
        ex = tl.minimum(ex, 127)
        dec = tl.where(nan, float("nan"), exp2i(ex))
        enc = tl.where(nan, float("nan"), exp2i(-ex))
        if HEADROOM != 1.0:
            enc = tl.math.div_rn(enc, tl.full(g.shape, HEADROOM, tl.float32))
            dec = dec * HEADROOM
    elif MODE == 4:  # BLOCK_2LVL: enc_ptr holds (S_enc / fmt_max, S_dec)
        per_unit = tl.load(enc_ptr)
        s_dec = tl.load(enc_ptr + 1)
        u = g * per_unit
        u = tl.where(u > S_MAXF, S_MAXF, u)
        sb = _round(u, 0, False, S_MBITS, S_EMIN, S_MAXF, S_MIN_NORMAL, False)
        if SCALE_CEIL:  # round the block scale up: one scale quantum above where RNE fell short
            fl, _ = log2_parts(tl.where(sb > 0, sb, 1.0))
            fl = tl.where(sb > 0, fl, -1)  # binade_quantum(0) of the reference: frexp(0) = 0
            up = sb + exp2i(tl.maximum(fl, S_EMIN) - S_MBITS)
            sb = tl.where(sb < u, tl.where(up > S_MAXF, S_MAXF, up), sb)
        if ZERO_GUARD:
            sb = tl.where(sb == 0, 1.0, sb)
        enc = tl.math.div_rn(tl.full(g.shape, 1.0, tl.float32), sb * s_dec)
        enc = tl.where(enc > FLT_MAX, FLT_MAX, enc)
        dec = sb
    else:  # BLOCK_GIVEN
        enc = tl.load(enc_ptr + gidx, mask=gmask, other=1.0)
        dec = tl.load(dec_ptr + gidx, mask=gmask, other=1.0)
    if NAN_GROUPS:  # no special values: the group decodes to NaN
        dec = tl.where(bad, float("nan"), dec)
    return enc, dec


@triton.jit(do_not_specialize=["seed"])
def quantize_kernel(
    x_ptr, R, C, stride_r, stride_c, enc_ptr, dec_ptr, encc_ptr, signs_ptr, seed,
    codes_ptr, codes_t_ptr, dense_ptr, scales_ptr, mask_ptr, amax_ptr,
    BR: tl.constexpr, BC: tl.constexpr, MODE: tl.constexpr, GR: tl.constexpr, GC: tl.constexpr,
    EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, EMIN: tl.constexpr,
    MAXF: tl.constexpr, MIN_NORMAL: tl.constexpr, IS_INT: tl.constexpr, HAS_INF: tl.constexpr,
    NAN_KIND: tl.constexpr, TORCH_FP8: tl.constexpr,
    S_MBITS: tl.constexpr = 3, S_EMIN: tl.constexpr = -6, S_MAXF: tl.constexpr = 448.0,
    S_MIN_NORMAL: tl.constexpr = 0.015625, ZERO_GUARD: tl.constexpr = False,
    SCALE_CEIL: tl.constexpr = False,
    IN_MAX: tl.constexpr = FLT_MAX, POW2: tl.constexpr = False, HEADROOM: tl.constexpr = 1.0,
    E8M0_CEIL: tl.constexpr = False, EMAX_ELEM: tl.constexpr = 8,
    HAD_LOG2N: tl.constexpr = 0, HAD_SCALE: tl.constexpr = 1.0, SIGNS: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = False, NAN_GROUPS: tl.constexpr = False,
    WRITE_CODES: tl.constexpr = False, PACK4: tl.constexpr = False,
    WRITE_T: tl.constexpr = False, COLWISE: tl.constexpr = False,
    WRITE_DENSE: tl.constexpr = False, DENSE_GLOBAL: tl.constexpr = False,
    WRITE_MASK: tl.constexpr = False, WRITE_SCALES: tl.constexpr = False,
    WRITE_AMAX: tl.constexpr = False,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    rm = rows < R
    cm = cols < C
    m = rm[:, None] & cm[None, :]
    offs = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAD_LOG2N > 0:
        x = hadamard_rows(x, signs_ptr, BR, BC, HAD_LOG2N, HAD_SCALE, SIGNS)
    fin = is_finite(x)
    # -- scales --------------------------------------------------------------------------------
    if MODE == 0:  # TENSOR
        enc = tl.load(enc_ptr)
        dec = tl.load(dec_ptr)
    elif MODE == 1:  # ROW
        enc = tl.load(enc_ptr + rows, mask=rm, other=1.0)[:, None]
        dec = tl.load(dec_ptr + rows, mask=rm, other=1.0)[:, None]
    else:
        code = _group_max(tl.where(fin, 0.0, tl.where(x != x, 2.0, 1.0)), BR, BC, GR, GC)
        bad = code > 0
        g = _ref_max(_group_max(tl.where(fin, tl.abs(x), 0.0), BR, BC, GR, GC), code)
        n_gc = C // GC
        grow = pid_r * (BR // GR) + tl.arange(0, BR // GR)
        gcol = pid_c * (BC // GC) + tl.arange(0, BC // GC)
        gidx = grow[:, None].to(tl.int64) * n_gc + gcol[None, :]
        gmask = (grow < R // GR)[:, None] & (gcol < n_gc)[None, :]
        genc, gdec = _block_scales(
            g, bad, enc_ptr, dec_ptr, gidx, gmask, MODE, MAXF, IN_MAX, POW2, HEADROOM,
            E8M0_CEIL, EMAX_ELEM, S_MBITS, S_EMIN, S_MAXF, S_MIN_NORMAL, ZERO_GUARD,
            SCALE_CEIL, NAN_GROUPS,
        )  # fmt: skip
        if WRITE_SCALES:
            tl.store(scales_ptr + gidx, gdec, mask=gmask)
        enc = _expand(genc, BR, BC, GR, GC)
        dec = _expand(gdec, BR, BC, GR, GC)
    # -- scale, round, encode, store -------------------------------------------------------------
    y = x * enc
    if STOCHASTIC:
        rbits = tl.randint(seed, rows[:, None].to(tl.int64) * C + cols[None, :])
    else:
        rbits = 0
    q = _round(y, rbits, STOCHASTIC, MBITS, EMIN, MAXF, MIN_NORMAL, IS_INT)
    q = _finish(q, fin, y, NAN_GROUPS, HAS_INF)
    if WRITE_CODES:
        code = encode_grid(q, EBITS, MBITS, BIAS, EMIN, MIN_NORMAL, IS_INT, HAS_INF, NAN_KIND,
                           TORCH_FP8)  # fmt: skip
        cty = codes_ptr.dtype.element_ty
        if PACK4:
            lo, hi = tl.split(tl.reshape(code, (BR, BC // 2, 2)))
            packed = (lo & 0xF) | ((hi & 0xF) << 4)
            pcols = pid_c * (BC // 2) + tl.arange(0, BC // 2)
            po = rows[:, None].to(tl.int64) * (C // 2) + pcols[None, :]
            tl.store(codes_ptr + po, packed.to(cty), mask=rm[:, None] & (pcols < C // 2)[None, :])
        else:
            co = rows[:, None].to(tl.int64) * C + cols[None, :]
            tl.store(codes_ptr + co, code.to(cty), mask=m)
        if WRITE_T:  # the same codes, transposed: what the other GEMM's operand needs
            to = cols[:, None].to(tl.int64) * R + rows[None, :]
            tl.store(codes_t_ptr + to, tl.trans(code).to(cty), mask=tl.trans(m))
    if COLWISE:  # rowwise scaling's column-wise copy: each column on its own scale
        encc = tl.load(encc_ptr + cols, mask=cm, other=1.0)[None, :]
        if STOCHASTIC:
            rbits_c = tl.randint(seed, cols[None, :].to(tl.int64) * R + rows[:, None])
        else:
            rbits_c = 0
        qc = _round(x * encc, rbits_c, STOCHASTIC, MBITS, EMIN, MAXF, MIN_NORMAL, IS_INT)
        qc = _finish(qc, fin, x * encc, NAN_GROUPS, HAS_INF)
        cc = encode_grid(qc, EBITS, MBITS, BIAS, EMIN, MIN_NORMAL, IS_INT, HAS_INF, NAN_KIND,
                         TORCH_FP8)  # fmt: skip
        to = cols[:, None].to(tl.int64) * R + rows[None, :]
        tl.store(codes_t_ptr + to, tl.trans(cc).to(codes_t_ptr.dtype.element_ty),
                 mask=tl.trans(m))  # fmt: skip
    if WRITE_DENSE:
        d = q * dec
        if DENSE_GLOBAL:
            d = d * tl.load(enc_ptr + 1)  # two-level S_dec, after the block scale
        do = rows[:, None].to(tl.int64) * C + cols[None, :]
        tl.store(dense_ptr + do, d.to(dense_ptr.dtype.element_ty), mask=m)
    if WRITE_MASK:
        mo = rows[:, None].to(tl.int64) * C + cols[None, :]
        tl.store(mask_ptr + mo, (tl.abs(y) < MAXF).to(tl.int8), mask=m)
    if WRITE_AMAX:  # (finite max, non-finite code) of the tile, as in kernels/amax.py
        a = tl.max(tl.max(tl.where(fin, tl.abs(x), 0.0), axis=1), axis=0)
        nf = tl.max(tl.max(tl.where(fin, 0.0, tl.where(x != x, 2.0, 1.0)), axis=1), axis=0)
        tile = pid_r * tl.num_programs(1) + pid_c
        tl.store(amax_ptr + 2 * tile, a)
        tl.store(amax_ptr + 2 * tile + 1, nf)
