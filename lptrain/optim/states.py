"""How AdamW's two moments are stored between steps (`optim.states`, algorithms.md §10).

A moment is decoded to FP32 at the start of a step, updated in FP32, and encoded again at
the end. The stored forms (block: 128 consecutive elements of the flat tensor):

* `fp32`: the moments as they are (8 bytes per parameter for both).
* `bf16`: each moment rounded to BF16, nearest-even (4 bytes). BF16 has FP32's exponent range,
  so no scale is needed.
* `fp8`: E4M3 codes. m: one FP32 absmax scale per block. v: COAT's dynamic range expansion
  (Xi et al., ICLR 2025, §4.2) per block, two FP32 numbers per block (its max and the
  exponent k). 2 bytes + 12/128 per parameter.
* `int8-block`: symmetric INT8 codes for m, unsigned 8-bit codes of sqrt(v), one FP32 scale
  per block each (2 bytes + 8/128).

The second moment needs care: it spans twice the decades of m (it is a square), and a v
stored as 0 turns m / (sqrt(v) + eps) into m / eps, the step blow-up 8-bit Adam guards
against (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", §2). Measured on the
moments of a real run (BENCHMARKS.md, `bench_optim_states.py --moments`): for E4M3 the
expansion gives 5x lower median error than sqrt(v) and a 2.4x lower 99.9th percentile; for
8-bit integers, sqrt(v) with at least one code for a non-zero value leaves no v at 0 (linear
codes of v itself lose 3.4% of them).

Every function here takes FP32 or FP64 values: the FP64 call is the reference of the same
quantizer (its scales are FP32 numbers too; codes can differ only where a value sits on a
rounding midpoint to within FP32's precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lptrain.numerics.rounding import round_to_format
from lptrain.numerics.stats import sqnr_db

BLOCK = 128  # elements per scale, as bitsandbytes' and torchao's block-wise 8-bit Adam
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state keys for m and v


@dataclass(frozen=True)
class Codec:
    """One moment's stored form: element codes of `element` and FP32 numbers per block."""

    element: str  # "fp8_e4m3" | "int8" | "uint8"
    # "none": codes of x / scale; "sqrt": of sqrt(x) / scale (decode squares); "expand":
    # COAT's (x / max)^k x qmax with k per block (non-negative x only)
    transform: str
    qmax: float  # the code grid's largest magnitude: a block's max maps to it
    qmin: float = 0.0  # "expand": the smallest positive value of a block maps to this code

    @property
    def per_block(self) -> int:
        """FP32 numbers stored per block: the scale, and for "expand" the exponent k."""
        return 2 if self.transform == "expand" else 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.element == "int8" else torch.uint8


@dataclass(frozen=True)
class StateFormat:
    """`optim.states`: the form of each moment. `dtype` set: a plain cast (no codes, no scales)."""

    name: str
    dtype: torch.dtype | None = None
    m: Codec | None = None
    v: Codec | None = None

    def bytes_per_param(self) -> float:
        """Bytes both moments take per parameter (scales included, block padding left out)."""
        if self.dtype is not None:
            return 2 * torch.finfo(self.dtype).bits / 8
        return sum(1 + 4 * c.per_block / BLOCK for c in (self.m, self.v))

    def codec(self, name: str) -> Codec:
        """The codec of moment `name` (one of `MOMENTS`)."""
        return self.m if name == "exp_avg" else self.v


STATE_FORMATS = {
    "fp32": StateFormat("fp32", dtype=torch.float32),
    "bf16": StateFormat("bf16", dtype=torch.bfloat16),
    # E4M3: max 448, min normal 2^-6 (expanding to the subnormals measured worse in the tail)
    "fp8": StateFormat(
        "fp8",
        m=Codec("fp8_e4m3", "none", 448.0),
        v=Codec("fp8_e4m3", "expand", 448.0, 2.0**-6),
    ),
    "int8-block": StateFormat(
        "int8-block", m=Codec("int8", "none", 127.0), v=Codec("uint8", "sqrt", 255.0)
    ),
}


def blocks(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Flat `x` as (n_blocks, BLOCK), zero-padded to whole blocks of the tensor `x` is a slice
    of from its element `start` on: block boundaries sit at multiples of BLOCK of that tensor,
    so a slice's blocks are the whole tensor's (its first and last may be partial). A zero
    changes no block's scale (the largest magnitude, the smallest positive value)."""
    flat = x.reshape(-1)
    lead = start % BLOCK
    pad = (-(lead + flat.numel())) % BLOCK
    return torch.nn.functional.pad(flat, (lead, pad)).view(-1, BLOCK)


def n_blocks(numel: int, start: int = 0) -> int:
    """Blocks a slice of `numel` elements from `start` touches."""
    return -(-(start % BLOCK + numel) // BLOCK) if numel else 0


def _to_codes(t: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Codes of values already on the code grid's scale (|t| <= qmax)."""
    if codec.element == "fp8_e4m3":
        return round_to_format(t, "fp8_e4m3").float().to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.round(t).clamp_(-codec.qmax, codec.qmax)
    if codec.transform == "sqrt":  # a non-zero sqrt(v) keeps one code (module docstring)
        q = torch.where(t > 0, q.clamp(min=1), q)
    return q.to(codec.code_dtype)


def _code_values(codes: torch.Tensor, codec: Codec, dtype, start: int) -> torch.Tensor:
    """The codes' values as (n_blocks, BLOCK) in `dtype` (zero-padded as `blocks`)."""
    c = blocks(codes, start)
    return (c.view(torch.float8_e4m3fn) if codec.element == "fp8_e4m3" else c).to(dtype)


def _flat(b: torch.Tensor, numel: int, start: int) -> torch.Tensor:
    """The `numel` elements of `b = blocks(x, start)`: x again."""
    lead = start % BLOCK
    return b.reshape(-1)[lead : lead + numel]


def _expansion(b: torch.Tensor, hi: torch.Tensor, codec: Codec) -> torch.Tensor:
    """COAT's exponent per block, k = log(qmax / qmin) / log(max / min positive) in FP32: the
    block's range maps onto the format's normal range. `hi`: each block's max as FP32 (its
    absmax: the values are non-negative). A block of one value (or none) keeps k = 1."""
    lo = torch.where(b > 0, b, torch.full_like(b, float("inf"))).amin(dim=1).float()
    span = math.log(codec.qmax / codec.qmin)
    k = span / torch.log(hi / lo)
    return torch.where((hi > lo) & (lo > 0), k, torch.ones_like(k))


def encode(x: torch.Tensor, codec: Codec, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): flat codes of x's numel and `codec.per_block` FP32 numbers per block.
    `start`: x is a slice of a larger flat tensor from this element on, and its blocks are that
    tensor's (`blocks`): a ZeRO partition is encoded as part of its whole parameter group.

    The scale is the block's absmax / qmax ("none", "sqrt") or its max and k ("expand"); an
    all-zero block gets scale 1, so its codes are 0. A NaN or Inf makes its block's scale
    non-finite, so the whole block decodes to NaN (or Inf): non-finite stays non-finite
    (integer codes cannot hold a NaN themselves)."""
    b = blocks(x.sqrt() if codec.transform == "sqrt" else x, start)
    amax = b.abs().amax(dim=1).float()
    if codec.transform == "expand":
        hi = torch.where(amax == 0, torch.ones_like(amax), amax)
        k = _expansion(b, amax, codec)
        t = (b / hi.to(b.dtype)[:, None]).pow(k.to(b.dtype)[:, None]) * codec.qmax
        scales = torch.stack([hi, k], dim=1)
    else:
        scales = torch.where(amax == 0, torch.ones_like(amax), amax / codec.qmax)
        t = b / scales.to(b.dtype)[:, None]
    return _flat(_to_codes(t, codec), x.numel(), start).clone(), scales


def stored_values(
    codes: torch.Tensor, scales: torch.Tensor, codec: Codec, dtype=torch.float32, start: int = 0
):
    """The codes' values times the block scale, flat, in `dtype`: the stored quantity (sqrt(v)
    for "sqrt"; for "expand" the code values / qmax, before the k-th root)."""
    c = _code_values(codes, codec, dtype, start)
    s = scales.to(dtype)
    out = c / codec.qmax if codec.transform == "expand" else c * s[:, None]
    return _flat(out, codes.numel(), start)


def decode(
    codes: torch.Tensor, scales: torch.Tensor, codec: Codec, dtype=torch.float32, start: int = 0
):
    """The moment in `dtype` from `encode`'s output (the same `start`)."""
    if codec.transform == "expand":
        c = _code_values(codes, codec, dtype, start) / codec.qmax
        s = scales.to(dtype)
        x = s[:, :1] * c.pow(1 / s[:, 1:])
        return _flat(x, codes.numel(), start)
    x = stored_values(codes, scales, codec, dtype, start)
    return x * x if codec.transform == "sqrt" else x


QUANT_SUMS = ("signal", "error", "nonzero", "underflow")  # `quantization_sums`' entries


def quantization_sums(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """What storing moment `x` as `stored` (its decoded value) lost, as float64 sums that add
    over tensors: sum x², sum (x - stored)², finite non-zero entries of x (as the GEMM operands'
    underflow counts them), and those stored as 0. `quantization_metrics` turns them into SQNR
    and the underflow fraction.

    Cheap enough for a monitoring step (a few passes over the moment, no float64 copy): norms in
    the working precision as `numerics.stats` computes them, and, since every stored form keeps
    a 0 at 0, the entries stored as 0 that were not are the non-zero counts' difference."""
    signal = torch.linalg.vector_norm(x).double().square()
    error = torch.linalg.vector_norm(x - stored).double().square()
    if bool(signal.isfinite()):
        nonzero = torch.count_nonzero(x)
        lost = nonzero - torch.count_nonzero(stored)
    else:  # a NaN/Inf moment (its block decodes non-finite): count the finite entries only
        live = (x != 0) & x.isfinite()
        nonzero, lost = live.sum(), (live & (stored == 0)).sum()
    return torch.stack([signal, error, nonzero.double(), lost.double()])


def quantization_metrics(sums: torch.Tensor) -> tuple[float, float]:
    """(SQNR in dB, underflow fraction) from `quantization_sums`: 10 log10(signal / error),
    +inf when nothing was lost; the share of non-zero entries stored as 0 (0 when none is
    non-zero). A non-finite moment gives a non-finite SQNR."""
    signal, error, nonzero, underflow = sums.tolist()
    return sqnr_db(signal, error), underflow / nonzero if nonzero else 0.0


def get_state_format(name: str) -> StateFormat:
    if name not in STATE_FORMATS:
        raise ValueError(f"unknown optimizer state format {name!r}; known: {list(STATE_FORMATS)}")
    return STATE_FORMATS[name]
