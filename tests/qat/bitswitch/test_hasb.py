"""HASB pieces (lptrain/qat/bitswitch/hessian.py, hasb.py, budget.py): Hutchinson on quadratics,
roulette frequencies (chi-square at a fixed seed), the schedule, ALRS multipliers, the budget
solver against brute force."""

from __future__ import annotations

import random

import pytest
import torch

from lptrain.qat import bitswitch as bs

CHI2_999 = {1: 10.828, 3: 16.266}  # chi-square quantiles at 0.999 (scipy.stats.chi2.ppf)


def test_hutchinson_is_exact_for_diagonal_and_weights_batches():
    t1 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    d1, d2 = (
        torch.arange(1.0, 9.0, dtype=torch.float64),
        torch.arange(2.0, 18.0, 2, dtype=torch.float64),
    )

    def loss(d, w):
        return lambda: (0.5 * (d[:3] * t1 * t1).sum() + 0.5 * (d[3:] * t2 * t2).sum(), w)

    res = bs.hutchinson([loss(d1, 1), loss(d2, 3)], {"a": [t1], "b": [t2]}, max_iter=7, tol=1e-3)
    h = (d1 + 3 * d2) / 4  # Hv averaged over batches, weighted by batch size
    assert res.traces == {
        "a": pytest.approx(float(h[:3].sum())),
        "b": pytest.approx(float(h[3:].sum())),
    }
    assert res.iterations == 2  # v_i^2 = 1: the second draw repeats the first -> converged


def test_hutchinson_on_a_dense_quadratic_converges_to_each_block_trace():
    g = torch.Generator().manual_seed(3)
    n1, n2 = 4, 6
    m = torch.randn(n1 + n2, n1 + n2, generator=g, dtype=torch.float64)
    a = m @ m.T / 4 + torch.diag(torch.arange(1.0, n1 + n2 + 1, dtype=torch.float64))
    t1 = torch.randn(n1, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(n2, dtype=torch.float64, requires_grad=True)

    def loss():
        t = torch.cat([t1, t2])
        return 0.5 * t @ a @ t, 1.0

    n = 4000
    res = bs.hutchinson([loss], {"a": [t1], "b": [t2]}, max_iter=n, tol=0.0,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert res.iterations == n
    for name, idx in (("a", range(n1)), ("b", range(n1, n1 + n2))):
        idx = list(idx)
        # Variance of one draw: each pair {i, j}, i in the block, contributes its coefficient²
        # (2·A_ij when both are in the block, A_ij when only i is).
        var = sum(
            (2 if j in idx else 1) ** 2 * float(a[i, j]) ** 2
            for i in idx for j in range(n1 + n2) if j != i and not (j in idx and j < i)
        )  # fmt: skip
        exact = float(a.diagonal()[idx].sum())
        assert abs(res.traces[name] - exact) < 4 * (var / n) ** 0.5, (name, res.traces[name], exact)
    # The stopping rule: a loose tolerance stops early.
    early = bs.hutchinson([loss], {"a": [t1], "b": [t2]}, max_iter=50, tol=0.5)
    assert early.iterations < 50 and len(early.history) == early.iterations


def test_layer_traces_of_a_decoder_run_through_double_backward():
    from lptrain.config.schema import ModelConfig
    from lptrain.models.decoder import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="nano"), 257, 16).train()
    weights = {n: m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}  # fmt: skip
    tokens = torch.randint(1, 257, (2, 4, 17), generator=torch.Generator().manual_seed(0))
    hmt, res = bs.layer_traces(model, weights, list(tokens), max_iter=3, tol=1e-3, seed=0)
    again, _ = bs.layer_traces(model, weights, list(tokens), max_iter=3, tol=1e-3, seed=0)
    assert model.training and hmt == again and len(hmt) == 14
    assert all(torch.isfinite(torch.tensor(v)) for v in hmt.values())
    assert hmt["layers.0.mlp.w2"] == pytest.approx(res.traces["layers.0.mlp.w2"] / (64 * 128))


def _chi2(counts, probs) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


def test_roulette_frequencies_pass_chi_square():
    bits = [2, 4, 6, 8]
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=gen, dtype=torch.float64).tolist()
    for sensitive in (True, False):
        probs = bs.roulette_probs(bits, sensitive)
        counts = [0] * 4
        for x in u:
            counts[bs.roulette(x, probs)] += 1
        assert _chi2(counts, probs) < CHI2_999[3], (sensitive, counts)
        if sensitive:
            assert probs == pytest.approx([0.1, 0.2, 0.3, 0.4])
            assert _chi2(counts, probs[::-1]) > 1000  # a reversed table would fail
    assert bs.roulette(0.0, [0.1, 0.9]) == 0 and bs.roulette(0.1, [0.1, 0.9]) == 1
    assert bs.roulette(1 - 1e-17, [0.1, 0.9]) == 1


def test_sample_bits_follows_the_rule_and_is_a_function_of_seed_step_pass():
    hmt = {"calm": 0.1, "calm2": 0.2, "sensitive": 5.0}  # mean 1.77
    bits = [8, 6, 4, 2]
    assert bs.sample_bits(hmt, 6, bits, 0.0, bs.pass_generator(0, 3, 1)) == dict.fromkeys(hmt, 6)
    a = bs.sample_bits(hmt, 6, bits, 0.5, bs.pass_generator(0, 3, 1))
    assert a == bs.sample_bits(hmt, 6, bits, 0.5, bs.pass_generator(0, 3, 1))
    counts = {"calm": [0] * 4, "sensitive": [0] * 4}
    switched = 0
    for step in range(3000):
        got = bs.sample_bits(hmt, 8, bits, 0.5, bs.pass_generator(7, step, 2))
        for name in counts:
            counts[name][[2, 4, 6, 8].index(got[name])] += 1
        switched += got["calm2"] != 8
    # With σ = 1/2 a layer keeps the outer 8 w.p. 1/2 + 1/2·p(8).
    for name, p in (("calm", [0.125, 0.125, 0.125, 0.625]), ("sensitive", [0.05, 0.1, 0.15, 0.7])):
        assert _chi2(counts[name], p) < CHI2_999[3], (name, counts[name])
    assert _chi2([switched, 3000 - switched], [0.375, 0.625]) < CHI2_999[1]


def test_switch_probability_schedule_and_alrs_multipliers():
    sched = [bs.switch_probability(t, 10, 0.5, 3) for t in range(10)]
    assert sched[:3] == [0, 0, 0] and sched[3] == pytest.approx(0.2) and sched[9] == 0.5
    assert bs.alrs_multipliers([8, 6, 4, 2], 0.1) == pytest.approx([1, 0.1, 0.01, 0.001])
    assert bs.alrs_multipliers([8, 6, 4, 2], 0.5, stop_bit=4) == [1, 0.5, 0.25, 1.0]


def test_budget_solver_equals_brute_force():
    rng = random.Random(0)
    bits = [8, 6, 4, 2]
    for case in range(40):
        L = rng.randint(1, 6)
        sizes = [rng.choice([64, 128, 192, 256, 1024]) * rng.choice([1, 3]) for _ in range(L)]
        costs = [sorted(rng.random() * 10 for _ in bits[1:]) for _ in range(L)]
        costs = [[0.0, *c] for c in costs]  # 8 bits: no error; lower bits cost more
        budget = rng.choice([2.0, 3.0, 3.3, 4.5, 5.0, 6.9, 8.0])
        got = bs.solve(costs, sizes, bits, budget)
        assert got.average_bits <= budget + 1e-12, case
        assert got.cost == pytest.approx(bs.brute_force(costs, sizes, bits, budget)), case
        assert got.cost == pytest.approx(
            sum(costs[l][bits.index(b)] for l, b in enumerate(got.bits))
        )


def test_budget_solver_counts_stored_bits():
    """With `stored` (the bits each layer's export holds, scales included) the budget counts
    those: the same exact program, against brute force, and a case where nominal bits and
    stored bits choose differently."""
    rng = random.Random(1)
    bits = [8, 6, 4, 2]
    for case in range(30):
        L = rng.randint(1, 5)
        sizes = [rng.choice([64, 128, 192]) * rng.choice([1, 3]) for _ in range(L)]
        rows = [rng.choice([1, 2, 4]) for _ in range(L)]  # scale bits per weight, per layer
        stored = [[n * (b + r) for b in bits] for n, r in zip(sizes, rows, strict=True)]
        costs = [[0.0, *sorted(rng.random() * 10 for _ in bits[1:])] for _ in range(L)]
        budget = rng.choice([3.0, 4.5, 5.0, 6.9, 9.0])
        if budget * sum(sizes) < sum(r[-1] for r in stored):
            continue
        got = bs.solve(costs, sizes, bits, budget, stored)
        assert got.average_bits <= budget + 1e-12, case
        assert got.cost == pytest.approx(bs.brute_force(costs, sizes, bits, budget, stored))
    # Two layers of 100 weights, 1 scale bit per weight each: 4 and 4 bits fit a nominal
    # budget of 4 but not a stored one (5 + 5 > 4 · 200); the stored budget takes 4 and 2.
    costs, sizes = [[0, 1, 2, 9], [0, 1, 2, 3]], [100, 100]
    stored = [[100 * (b + 1) for b in bits]] * 2
    assert bs.solve(costs, sizes, bits, 4).bits == [4, 4]
    got = bs.solve(costs, sizes, bits, 4, stored)
    assert got.bits == [4, 2] and got.average_bits == 4.0
    with pytest.raises(ValueError, match="^budget: 2.5 is below the smallest possible 3 bits"):
        bs.solve(costs, sizes, bits, 2.5, stored)


def test_budget_solver_edges():
    costs, sizes, bits = [[0, 1, 2, 3], [0, 5, 6, 7]], [100, 300], [8, 6, 4, 2]
    assert bs.solve(costs, sizes, bits, 8).bits == [8, 8]
    assert bs.solve(costs, sizes, bits, 2).bits == [2, 2]
    assert bs.solve(costs, sizes, bits, 6.5).bits == [2, 8]  # (100·2 + 300·8)/400 = 6.5
    with pytest.raises(ValueError, match="^budget: 1.5 is below the smallest possible 2 bits"):
        bs.solve(costs, sizes, bits, 1.5)
    # Ties are broken the same way every time.
    flat = [[0, 0, 0, 0]] * 3
    assert bs.solve(flat, [10] * 3, bits, 4).bits == bs.solve(flat, [10] * 3, bits, 4).bits
