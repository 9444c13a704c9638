"""CompactAdamW (optim/adamw.py): FP32 states are torch's AdamW bit for bit; each compact form
follows the FP64 reference of the same algorithm; BF16-SR master weights round to a neighbour,
without bias, and the same on resume; a state dict restores every stored tensor as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lptrain.optim import CompactAdamW
from lptrain.optim import states as st
from lptrain.optim.adamw import adamw_reference

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _grads(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-4, 0, n)[torch.randperm(n, generator=g)]
    return [scale * torch.randn(n, generator=g) for _ in range(steps)]


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=g)).to(dtype)) for s in (300, 40)]


def test_fp32_states_are_torch_adamw_exact():
    ours, theirs = _params(), _params()
    a = CompactAdamW([{"params": ours[:1]}, {"params": ours[1:], "weight_decay": 0.0}], **HP)
    b = torch.optim.AdamW(
        [{"params": theirs[:1]}, {"params": theirs[1:], "weight_decay": 0.0}], **HP
    )
    for g0, g1 in zip(_grads(300, 5), _grads(40, 5, seed=2), strict=True):
        for ps in (ours, theirs):
            ps[0].grad, ps[1].grad = g0.clone(), g1.clone()
        a.step()
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs, strict=True))


def _agree(off: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor, step: torch.Tensor) -> None:
    """The same stored codes (`off`: where not) except where FP32 arithmetic moved a value
    across a rounding midpoint: at most 0.5% of the elements, each one grid step off."""
    assert off.float().mean() <= 0.005
    assert bool(((ours - ref).abs() <= step * (1 + 1e-6)).all())


@pytest.mark.parametrize("states", ["bf16", "fp8", "int8-block"])
def test_each_step_follows_the_float64_reference(states):
    # From the state the implementation stored, one FP64 step of the same algorithm: the
    # weights within FP32 rounding of the step size, the stored moments as `_agree` says.
    (p,) = _params()[:1]
    opt = CompactAdamW([p], **HP, states=states)
    fmt = st.STATE_FORMATS[states]
    m = v = torch.zeros(300, dtype=torch.float64)
    for t, g in enumerate(_grads(300, 6), start=1):
        w_before = p.detach().clone()
        p.grad = g
        opt.step()
        w_ref, m_ref, v_ref = adamw_reference(w_before, g, m, v, t, **HP)
        # two FP32 roundings of the weight (decay, update) and one of the step size
        bound = 2 * 2**-23 * w_ref.abs() + 1e-6 * HP["lr"]
        assert bool(((p.detach().double() - w_ref).abs() <= bound).all())
        state = opt.state[p]
        for name, ref, codec in (("exp_avg", m_ref, fmt.m), ("exp_avg_sq", v_ref, fmt.v)):
            if codec is None:  # a BF16 cast: one BF16 step is 2^-7 of the value
                ours, theirs = state[name].double(), ref.to(torch.bfloat16).double()
                _agree(ours != theirs, ours, theirs, theirs.abs() * 2**-7)
                continue
            codes, scales = st.encode(ref, codec)
            assert torch.allclose(state[f"{name}_scales"], scales, rtol=1e-6, atol=0)
            ours = st.stored_values(state[f"{name}_codes"], state[f"{name}_scales"], codec)
            theirs = st.stored_values(codes, scales, codec, torch.float64)
            # one grid step: 2^-3 of the value for E4M3's normals, else the block's scale
            # ("expand" stores code / qmax: its subnormal step is 2^-9 / 448)
            unit = scales if codec.per_block == 1 else torch.full_like(scales[:, 0], 2**-9 / 448)
            step = torch.maximum(theirs.abs() / 8, unit.double().repeat_interleave(128)[:300])
            _agree(state[f"{name}_codes"] != codes, ours.double(), theirs, step)
        m, v = (opt._load(state, k).double() for k in ("exp_avg", "exp_avg_sq"))


def test_compact_states_are_the_stored_codes_and_scales():
    (p,) = _params()[:1]
    opt = CompactAdamW([p], **HP, states="int8-block")
    p.grad = _grads(300, 1)[0]
    opt.step()
    kinds = {k: v.dtype for k, v in opt.state[p].items()}
    assert kinds == {
        "step": torch.float32,
        "exp_avg_codes": torch.int8,
        "exp_avg_scales": torch.float32,
        "exp_avg_sq_codes": torch.uint8,
        "exp_avg_sq_scales": torch.float32,
    }
    assert opt.state_bytes() == 2 * 300 + 2 * 4 * 3  # 1 byte per moment element + 3 scales each


def _bf16_run(seed: int, steps: int, resume_at: int | None = None) -> torch.Tensor:
    ps = _params(torch.bfloat16)
    opt = CompactAdamW(ps, **HP, states="fp8", master="bf16-sr", seed=seed)
    for t, g in enumerate(_grads(300, steps)):
        if t == resume_at:  # a restart: a new optimizer loads the saved state
            saved = copy.deepcopy(opt.state_dict())
            ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
            opt = CompactAdamW(ps, **HP, states="fp8", master="bf16-sr", seed=seed)
            opt.load_state_dict(saved)
        ps[0].grad, ps[1].grad = g.bfloat16(), g[:40].bfloat16()
        opt.step()
    return torch.cat([p.detach().float() for p in ps])


def test_bf16_sr_is_exact_on_resume_and_depends_on_the_seed():
    straight = _bf16_run(seed=3, steps=6)
    assert torch.equal(_bf16_run(seed=3, steps=6, resume_at=3), straight)
    assert not torch.equal(_bf16_run(seed=4, steps=6), straight)


def test_bf16_sr_rounds_to_a_neighbour_without_bias():
    # 400 seeds of one step: every result is one of the two BF16 neighbours of the FP64
    # reference weight, and their mean is that weight to within 5 binomial standard errors.
    (p0,) = _params(torch.bfloat16)[:1]
    g = _grads(300, 1)[0]
    zero = torch.zeros(300, dtype=torch.float64)
    exact, _, _ = adamw_reference(p0.detach(), g.bfloat16(), zero, zero, 1, **HP)
    results = []
    for seed in range(400):
        p = torch.nn.Parameter(p0.detach().clone())
        opt = CompactAdamW([p], **HP, master="bf16-sr", seed=seed)
        p.grad = g.bfloat16()
        opt.step()
        results.append(p.detach().double())
    r = torch.stack(results)
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)  # BF16 step at |w|
    assert bool(((r - exact).abs() <= ulp).all())  # never farther than one BF16 step
    up = torch.remainder(exact.abs(), ulp) / ulp  # P(round away from zero)
    # FP32 computes the new weight to within 2 ulps (test above), which shifts P(up) too
    bound = ulp * (5 * (up * (1 - up) / 400).sqrt()) + 2 * 2**-23 * exact.abs() + 1e-6 * HP["lr"]
    assert bool(((r.mean(dim=0) - exact).abs() <= bound).all())


def test_load_state_dict_keeps_fp32_scales_next_to_bf16_weights():
    ps = _params(torch.bfloat16)
    opt = CompactAdamW(ps, **HP, states="int8-block", master="bf16-sr")
    ps[0].grad, ps[1].grad = torch.ones(300).bfloat16(), torch.ones(40).bfloat16()
    opt.step()
    other = CompactAdamW(ps, **HP, states="int8-block", master="bf16-sr")
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in ps:
        for k, v in opt.state[p].items():
            assert other.state[p][k].dtype == v.dtype and torch.equal(other.state[p][k], v)


def test_wrong_parameter_dtype_or_master_is_refused():
    with pytest.raises(ValueError, match="bf16-sr.*bfloat16"):
        CompactAdamW(_params(), master="bf16-sr")
    with pytest.raises(ValueError, match="master must be one of"):
        CompactAdamW(_params(), master="fp16")
    with pytest.raises(ValueError, match="unknown optimizer state format"):
        CompactAdamW(_params(), states="int4")
    assert st.BLOCK == 128


def _stored64(x: torch.Tensor, codec) -> torch.Tensor:
    """What a compact form stores for the FP64 moment `x`, decoded in FP64."""
    if codec is None:  # bf16: a cast
        return x.to(torch.bfloat16).double()
    return st.decode(*st.encode(x, codec), codec, torch.float64)


@pytest.mark.parametrize("states", ["bf16", "fp8", "int8-block"])
def test_recorded_moment_statistics_are_the_float64_recomputation(states):
    """`record_moments`: per moment, the SQNR of the stored form against the fresh moment and
    the share of non-zero entries stored as 0 equal a recomputation in FP64 from the reference
    step; nothing is recorded while it is off, and nothing reaches the state dict."""
    (p,) = _params()[:1]
    opt = CompactAdamW([p], **HP, states=states)
    fmt = st.STATE_FORMATS[states]
    g = torch.Generator().manual_seed(3)
    # eight decades of gradient: some first moments fall below fp8's and int8's smallest code
    decades = torch.logspace(-8, 0, 300)[torch.randperm(300, generator=g)]
    grads = [decades * torch.randn(300, generator=g) for _ in range(2)]
    m = v = torch.zeros(300, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        w_before = p.detach().clone()
        p.grad = grad
        opt.record_moments = t == 2
        opt.step()
        if t == 1:
            assert opt.moment_stats == {}
        else:
            _, m_ref, v_ref = adamw_reference(w_before, grad, m, v, t, **HP)
            for sums, x, codec in zip(
                opt.moment_stats[p], (m_ref, v_ref), (fmt.m, fmt.v), strict=True
            ):
                q = _stored64(x, codec)
                sqnr = 10 * torch.log10(x.square().sum() / (x - q).square().sum())
                under = ((x != 0) & (q == 0)).sum() / (x != 0).sum()
                got_sqnr, got_under = st.quantization_metrics(sums)
                assert got_sqnr == pytest.approx(float(sqnr), abs=1e-3)
                assert got_under == pytest.approx(float(under), abs=1 / 300)
        m, v = (opt._load(opt.state[p], k).double() for k in ("exp_avg", "exp_avg_sq"))
    sqnr_m, under_m = st.quantization_metrics(opt.moment_stats[p][0])
    assert {"bf16": under_m == 0, "fp8": under_m > 0.01, "int8-block": under_m > 0.1}[states]
    assert set(opt.state_dict()["state"][0]) == set(opt.state[p])  # no statistics in it


def test_quantization_metrics_keep_a_nonfinite_moment_nonfinite():
    x = torch.tensor([1.0, float("nan"), 0.0])
    sqnr, under = st.quantization_metrics(st.quantization_sums(x, torch.tensor([1.0, 0.0, 0.0])))
    assert math.isnan(sqnr) and under == 0.0
    exact = st.quantization_sums(x[:1], x[:1])
    assert st.quantization_metrics(exact) == (math.inf, 0.0)


@pytest.mark.parametrize("states", ["fp32", "bf16", "fp8", "int8-block"])
def test_an_empty_parameter_steps_and_saves(states):
    """A parameter with no elements: the step runs and its state round-trips."""
    p = torch.nn.Parameter(torch.zeros(0, 4))
    opt = CompactAdamW([p], states=states)
    p.grad = torch.zeros(0, 4)
    opt.step()
    again = CompactAdamW([p], states=states)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert p.shape == (0, 4) and opt.state_bytes() >= 0
