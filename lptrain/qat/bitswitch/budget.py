"""Per-layer bit-widths under an average-bit budget, solved exactly (HASB's sub-net selection,
algorithms.md §7.3 step 5; the reference's ILP was not readable, this is our formulation).

Problem: choose b_l ∈ B for every layer l to

    minimise   Σ_l cost_l(b_l)            cost_l(b) = max(HMT_l, 0) · ‖Ŵ_l,b − Ŵ_l,h‖²
    subject to Σ_l n_l · b_l <= budget · Σ_l n_l          (n_l = weights of layer l)

i.e. the second-order (HAWQ-style) loss increase of quantizing each layer below the stored
h bits, under an average number of bits per weight. It is a multiple-choice knapsack. With
all capacities integers (n_l·(b - b_min) divided by their greatest common divisor), the
dynamic program over layers and used capacity below is exact: `solve` returns an assignment
of minimal total cost among all that meet the budget (tests compare it with brute force).
Cost O(L · |B| · C), C = the capacity in gcd units (small for real shapes: widths share
large powers of two).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

import numpy as np

from lptrain.errors import ConfigError

MAX_CELLS = 200_000_000  # L·|B|·C above this: refuse rather than run for hours


@dataclass(frozen=True)
class Assignment:
    bits: list[int]  # per layer
    cost: float
    average_bits: float  # Σ n_l b_l / Σ n_l


def solve(
    costs: Sequence[Sequence[float]], sizes: Sequence[int], bits: Sequence[int], budget: float
) -> Assignment:
    """costs[l][k]: layer l at bits[k]; sizes[l] = n_l; budget in average bits per weight."""
    c = np.asarray(costs, dtype=np.float64)
    n = [int(s) for s in sizes]
    L, K = c.shape
    if K != len(bits) or L != len(n):
        raise ValueError("costs must be (layers, bit-widths)")
    b_min, total = min(bits), sum(n)
    if budget < b_min:
        raise ConfigError("budget", f"{budget} is below the smallest bit-width {b_min}")
    extra = [[n_l * (b - b_min) for b in bits] for n_l in n]  # weight·bits above b_min
    unit = reduce(math.gcd, (e for row in extra for e in row if e), 0) or 1
    w = np.asarray(extra, dtype=np.int64) // unit  # integer capacities
    # Capacity in units: floor of the (real) spare bits, never more than all-highest uses.
    cap = min(int(math.floor((budget - b_min) * total / unit + 1e-9)), int(w.max(1).sum()))
    if L * K * (cap + 1) > MAX_CELLS:
        raise ConfigError("budget", f"the exact program needs {L * K * (cap + 1)} cells; too big")
    dp = np.zeros(cap + 1)  # dp[u]: min cost of the layers so far using <= u units
    choice = np.zeros((L, cap + 1), dtype=np.int64)
    for l in range(L):
        best = np.full(cap + 1, np.inf)
        for k in range(K):
            wk = int(w[l, k])
            if wk > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[wk:] = dp[: cap + 1 - wk] + c[l, k]
            better = cand < best  # strict: the first k wins ties (deterministic)
            best[better], choice[l, better] = cand[better], k
        dp = best
    ks, u = [0] * L, cap
    for l in reversed(range(L)):  # walk the choices back from the full capacity
        ks[l] = int(choice[l, u])
        u -= int(w[l, ks[l]])
    chosen = [bits[k] for k in ks]
    avg = sum(n_l * b for n_l, b in zip(n, chosen, strict=True)) / total
    return Assignment(chosen, float(dp[cap]), avg)


def brute_force(costs, sizes, bits, budget) -> float:
    """The minimum by enumeration (tests; |B|^L assignments)."""

    total, best = sum(sizes), math.inf
    for ks in itertools.product(range(len(bits)), repeat=len(sizes)):
        mass = sum(n * bits[k] for n, k in zip(sizes, ks, strict=True))
        if mass <= budget * total + 1e-9:
            best = min(best, sum(costs[l][k] for l, k in enumerate(ks)))
    return best
