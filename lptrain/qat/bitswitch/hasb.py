"""HASB: Hessian-aware stochastic bit-switching (algorithms.md §7.3 steps 2-4) and ALRS's
learning-rate rule (§7.2).

During joint training at the outer bit-width b, each layer switches with probability σ_t to a
bit-width drawn by roulette: a layer whose average Hessian trace (HMT) is below the mean of all
layers draws uniformly over the candidates; a sensitive one (HMT >= mean) draws b' with
probability b' / Σ candidates (2,4,6,8 -> 0.1, 0.2, 0.3, 0.4), so it tends to stay precise.

The draws come from a generator seeded by (run seed, step, pass): the same on every rank, and
after a resume the step alone reproduces them, so the sampling state cannot drift.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


def switch_probability(step: int, total_steps: int, sigma: float, warmup_steps: int) -> float:
    """σ_t: 0 for the first `warmup_steps`, then σ·(t+1)/T — the reference's per-epoch
    schedule σ·(epoch+1)/epochs after `mix_warmup` epochs, counted in optimizer steps."""
    if step < warmup_steps:
        return 0.0
    return sigma * (step + 1) / max(total_steps, 1)


def roulette_probs(bits: Sequence[int], sensitive: bool) -> list[float]:
    """Probabilities over `bits` (ascending): uniform, or proportional to the bit-width."""
    if not sensitive:
        return [1.0 / len(bits)] * len(bits)
    total = float(sum(bits))
    return [b / total for b in bits]


def roulette(u: float, probs: Sequence[float]) -> int:
    """Inverse-CDF draw: the first index whose cumulative probability exceeds u ∈ [0, 1)."""
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1  # u within rounding of 1


def pass_generator(seed: int, step: int, k: int) -> torch.Generator:
    """A generator for pass k of step `step`: a pure function of integers (never hash())."""
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + k * 0xC2B2AE3D + 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample_bits(
    hmt: Mapping[str, float],
    outer: int,
    bits: Sequence[int],
    sigma_t: float,
    gen: torch.Generator,
) -> dict[str, int]:
    """{layer: bit-width} for one pass at the outer bit-width `outer` (§7.3 step 3)."""
    asc = sorted(bits)
    known = [v for v in hmt.values() if math.isfinite(v)]
    avg = sum(known) / len(known) if known else 0.0
    out = {}
    for name, h in hmt.items():
        r, u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        if r < sigma_t:
            out[name] = asc[roulette(u, roulette_probs(asc, sensitive=h >= avg))]
        else:
            out[name] = outer
    return out


def alrs_multipliers(bits: Sequence[int], alpha: float, stop_bit: int = 0) -> list[float]:
    """ALRS (§7.2): the quantizer-scale group's lr factor for each pass, bits highest first:
    α^k for the k-th bit-width while it is >= `stop_bit` (reference default 0: always), 1 for
    those below it."""
    return [alpha**k if b >= stop_bit else 1.0 for k, b in enumerate(bits)]
