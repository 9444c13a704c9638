"""Per-layer bit-widths under an average-bit budget, solved exactly (HASB's sub-net selection,
algorithms.md §7.3 step 5; the reference's ILP was not readable, this is our formulation).

Problem: choose b_l ∈ B for every layer l to

    minimise   Σ_l cost_l(b_l)            cost_l(b) = max(HMT_l, 0) · ‖Ŵ_l,b − Ŵ_l,h‖²
    subject to Σ_l S_l(b_l) <= budget · Σ_l n_l          (n_l = weights of layer l)

i.e. the second-order (HAWQ-style) loss increase of quantizing each layer below the stored
h bits, under an average number of bits per weight. S_l(b) is what layer l costs at b bits:
`stored[l][k]`, the bits its export really holds (`lptrain switch` passes 8 × the bytes of the
switched layer's codes, steps and input step: export/switch.py), or, when `stored` is not
given, the nominal n_l · b. It is a multiple-choice knapsack. With all capacities integers
(S_l(b) − min_b S_l(b) divided by their greatest common divisor), the dynamic program over
layers and used capacity below is exact: `solve` returns an assignment of minimal total cost
among all that meet the budget (tests compare it with brute force). Cost O(L · |B| · C), C =
the capacity in gcd units (small for real shapes: widths share large powers of two).
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
    average_bits: float  # Σ S_l(b_l) / Σ n_l: stored bits per weight (nominal without `stored`)


def sizes_in_bits(
    sizes: Sequence[int], bits: Sequence[int], stored: Sequence[Sequence[int]] | None
) -> list[list[int]]:
    """S_l(bits[k]) for every layer and bit-width: `stored` as given, or the nominal n_l · b."""
    if stored is None:
        return [[int(n) * b for b in bits] for n in sizes]
    return [[int(v) for v in row] for row in stored]


def solve(
    costs: Sequence[Sequence[float]],
    sizes: Sequence[int],
    bits: Sequence[int],
    budget: float,
    stored: Sequence[Sequence[int]] | None = None,
) -> Assignment:
    """costs[l][k]: layer l at bits[k]; sizes[l] = n_l; stored[l][k]: the bits layer l holds at
    bits[k] (None: n_l · bits[k]); budget in average bits per weight, counted as `stored`."""
    c = np.asarray(costs, dtype=np.float64)
    n = [int(s) for s in sizes]
    S = sizes_in_bits(n, bits, stored)
    L, K = c.shape
    if K != len(bits) or L != len(n) or any(len(row) != K for row in S):
        raise ValueError("costs and stored must be (layers, bit-widths)")
    total = sum(n)
    floor = sum(min(row) for row in S)  # every layer at its smallest
    if budget * total < floor - 1e-9:
        least = floor / total
        raise ConfigError("budget", f"{budget} is below the smallest possible {least:.4g} bits")
    extra = [[v - min(row) for v in row] for row in S]  # bits above each layer's smallest
    unit = reduce(math.gcd, (e for row in extra for e in row if e), 0) or 1
    w = np.asarray(extra, dtype=np.int64) // unit  # integer capacities
    # Capacity in units: floor of the (real) spare bits, never more than all-largest uses.
    cap = min(int(math.floor((budget * total - floor) / unit + 1e-9)), int(w.max(1).sum()))
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
    avg = sum(S[l][k] for l, k in enumerate(ks)) / total
    return Assignment(chosen, float(dp[cap]), avg)


def brute_force(costs, sizes, bits, budget, stored=None) -> float:
    """The minimum by enumeration (tests; |B|^L assignments)."""

    S = sizes_in_bits(sizes, bits, stored)
    total, best = sum(sizes), math.inf
    for ks in itertools.product(range(len(bits)), repeat=len(sizes)):
        mass = sum(S[l][k] for l, k in enumerate(ks))
        if mass <= budget * total + 1e-9:
            best = min(best, sum(costs[l][k] for l, k in enumerate(ks)))
    return best
