"""NF4 with double-quantized scales: QLoRA's storage of a frozen weight (algorithms.md §2.9).

QLoRA (Dettmers et al. 2023, §3) stores a weight as 4-bit NormalFloat codes, one absmax scale
per block of 64 weights, and quantizes those scales again ("double quantization"): their mean
is subtracted and they are stored as 8-bit codes of a dynamic (float-like) map with one fp32
absmax per 256 scales. This module is the pure-PyTorch specification, written to follow
bitsandbytes' CPU arithmetic step for step so that it is bit-equal to
`quantize_4bit(w, quant_type="nf4", compress_statistics=True)` + `dequantize_4bit` (bitsandbytes
0.50, tests/numerics/test_nf4.py):

1. first level (bitsandbytes' PyTorch kernel): absmax per block, x · (1/absmax) clamped to
   [-1, 1], the nearest NF4 value (a tie goes to the lower one: `bucketize` on the midpoints);
2. second level (its C kernel): offset = mean of the absmaxes, c = absmax - offset, per 256:
   m = max|c|, v = c · (1/m) and the 8-bit code a 65536-entry table gives for v's bin;
3. dequantization: scale = map[code] · m + offset, weight = NF4[index] · scale (fp32).

Non-finite weights stay non-finite: a NaN or Inf reaches the fp32 absmax (and the mean, so
every scale) and every dequantized weight of the layer becomes NaN.
"""

from __future__ import annotations

from functools import lru_cache

import torch

# QLoRA's NormalFloat4 (bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero; index order is value order.
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
SCALE_BLOCK = 256  # scales per second-level (fp32) absmax, as in QLoRA
_BINS = 65536  # bitsandbytes' CPU kernel maps [-1, 1] to this many bins, then bin -> code


@lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, Dettmers 2015): for
    exponents 10^-6..10^0 a linear fraction grid of doubling size, plus 0 and 1; sorted."""
    data: list[float] = []
    for i in range(7):  # 7 exponent bits, 8 bits in all, signed: 2^i fraction items
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@lru_cache(maxsize=1)
def _bin_to_code() -> torch.Tensor:
    """bitsandbytes' table from bin i (value -1 + 2i/65535) to the index of the first code whose
    midpoint with its successor is >= that value: nearest code up to the bin width."""
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_BINS, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / (_BINS - 1)
    return torch.searchsorted(mids, val, right=False).to(torch.uint8)


def quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: (NF4 indices uint8, shape of `w`; fp32 absmax per `block` consecutive
    weights). `w.numel()` must be a multiple of `block`."""
    blocks = w.detach().float().reshape(-1, block)  # (numel/block, block)
    absmax = blocks.abs().amax(-1)
    # bitsandbytes multiplies by the reciprocal (not a division): bit-equal needs the same
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    table = NF4.to(blocks.device)
    mids = (table[:-1] + table[1:]) / 2
    idx = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)
    return idx.reshape(w.shape), absmax


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level (double quantization) of a 1-d fp32 absmax vector: (8-bit codes, fp32
    absmax per SCALE_BLOCK codes, fp32 offset = the mean)."""
    offset = absmax.mean()
    c = absmax - offset
    n = c.numel()
    padded = torch.nn.functional.pad(c, (0, -n % SCALE_BLOCK))  # zeros leave a max unchanged
    m = padded.reshape(-1, SCALE_BLOCK).abs().amax(-1)  # (blocks,)
    v = torch.clamp(c * (1.0 / m).repeat_interleave(SCALE_BLOCK)[:n], -1, 1)
    # bin = trunc(fma((v + 1) * 0.5, 65535, 0.5)): the C kernel's fused multiply-add, exact
    # here in float64 (a float32 times 65535 has <= 40 significant bits) and rounded once.
    half = (v + 1.0) * 0.5
    fused = (half.double() * (_BINS - 1) + 0.5).float()
    fused = torch.nan_to_num(fused, nan=0.0)  # NaN: any code, the fp32 m is NaN already
    codes = _bin_to_code().to(c.device)[fused.long() & 0xFFFF]
    zero = (m == 0).repeat_interleave(SCALE_BLOCK)[:n]  # an all-zero block: code 0, as in C
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    return codes, m, offset


def dequantize_scales(
    codes: torch.Tensor, block_absmax: torch.Tensor, offset: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """The fp32 absmaxes `codes` stand for; codes[0] is scale number `start` of the layer."""
    which = torch.arange(start, start + codes.numel(), device=codes.device) // SCALE_BLOCK
    code = dynamic_map().to(codes.device)
    return code[codes.long()] * block_absmax[which] + offset


def dequantize(idx: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """NF4[idx] · absmax of its block, fp32, shape of `idx`."""
    q = NF4.to(idx.device)[idx.long()].reshape(-1, block)
    return (q * absmax.reshape(-1, 1)).reshape(idx.shape)
