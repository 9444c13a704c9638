"""The autograd Function (nn/function.py): Hadamard rotations cancel in all three GEMMs,
stochastic-rounding gradients are unbiased over draws."""

from __future__ import annotations

import pytest
import torch

from lptrain import recipes
from lptrain.testing import Problem, sqnr_db


def _widen(spec):
    """QuEST's clipping (scale_from='std') widened so that it clips nothing."""
    return spec.replace(clip_sigmas=1e4) if spec.scale_from == "std" else spec


def _strip_hadamard(spec):
    return None if spec is None else spec.replace(hadamard=None, hadamard_signs=False)


def _lossless(recipe, strip: bool, fmt: str = "e5m10"):
    """`recipe` with every element format replaced by `fmt` (rel. error 2^-11), QuEST's
    clipping widened and two-level block scales made FP32 (an RNE-rounded-down UE4M3 block
    scale saturates the block max by up to 6%, a clipping no element format removes);
    Hadamards optionally removed."""
    out = {}
    for g in ("output", "grad_input", "grad_weight"):
        gr = recipe.gemm(g)
        specs = []
        for s in (gr.a, gr.b):
            if s is not None:
                s = _widen(s.replace(format=fmt))
                if s.two_level:
                    s = s.replace(scale_format="fp32")
                s = _strip_hadamard(s) if strip else s
            specs.append(s)
        out[g] = gr.__class__(specs[0], specs[1], gr.accumulate, gr.chunk)
    return recipe.replace(name=f"{recipe.name}-{fmt}{'-noH' if strip else ''}", **out)


@pytest.mark.parametrize("name", ["nvfp4", "quartet", "fp4-ue5m3"])
def test_hadamard_cancels_when_quantization_is_near_lossless(problem: Problem, name: str):
    rotated = _lossless(recipes.get(name), strip=False)
    plain = _lossless(recipes.get(name), strip=True)
    assert any(
        s is not None and s.hadamard
        for g in ("output", "grad_input", "grad_weight")
        for s in (rotated.gemm(g).a, rotated.gemm(g).b)
    )
    got = problem.run(problem.layer(rotated))
    want = problem.run(problem.layer(plain))
    refs = (problem.y_ref, problem.dx_ref, problem.dw_ref)
    for what, a, b, r in zip(("output", "grad_input", "grad_weight"), got, want, refs, strict=True):
        # e5m10 alone gives ~60 dB; a rotation that does not cancel gives ~0 dB.
        assert sqnr_db(a, r) > 55, f"{name} {what} rotated: {sqnr_db(a, r):.1f} dB"
        assert sqnr_db(b, r) > 55, f"{name} {what} plain: {sqnr_db(b, r):.1f} dB"
        assert sqnr_db(a, b) > 52, f"{name} {what}: rotated vs plain {sqnr_db(a, b):.1f} dB"


def _mean_wgrad_error(recipe, problem: Problem, draws: int) -> float:
    """Relative error of the mean of `draws` grad_weights against float64."""
    lin = problem.layer(recipe, seed=123)
    acc = torch.zeros_like(problem.dw_ref)
    for _ in range(draws):
        acc += problem.run(lin)[2].double()
    mean = acc / draws
    return float((mean - problem.dw_ref).norm() / problem.dw_ref.norm())


# mxfp4 is unbiased only thanks to its 3/4 gradient pre-scale (headroom 4/3): with the OCP
# floor rule alone, block maxima up to 2^(emax+1) > 6 clip before stochastic rounding (measured
# 1 -> 32 draws: 0.16 -> 0.05, far from 1/sqrt(32)); test_mxfp4_without_headroom_is_biased.
@pytest.mark.parametrize("name", ["nvfp4", "quartet", "fp4-ue5m3", "mxfp4"])
def test_stochastic_grad_weight_is_unbiased_over_draws(name: str):
    # Only the stochastic (FP4) operands stay FP4: the nearest-rounded operands become e5m10 so
    # that their deterministic error does not mask a bias. An unbiased quantizer's mean error
    # falls ~1/sqrt(S) (5.7x from 1 to 32 draws); a biased one (e.g. nearest) stays flat.
    problem = Problem(t=128, k=64, n=64, seed=1)
    base = recipes.get(name)
    specs = {}
    for g in ("output", "grad_input", "grad_weight"):
        gr = base.gemm(g)
        keep = [
            s
            if s is not None and s.rounding == "stochastic"
            else (_widen(s.replace(format="e5m10")) if s is not None else None)
            for s in (gr.a, gr.b)
        ]
        specs[g] = gr.__class__(keep[0], keep[1], gr.accumulate, gr.chunk)
    sr = base.replace(name=f"{name}-sr-only", **specs)
    e1 = _mean_wgrad_error(sr, problem, 1)
    e32 = _mean_wgrad_error(sr, problem, 32)
    assert e1 > 0.05  # really 4-bit stochastic
    assert e32 < e1 / 4, f"{name}: mean error {e1:.4f} (1 draw) -> {e32:.4f} (32 draws)"
    # The same recipe with nearest rounding (and fixed Hadamard signs: re-drawn rotations
    # decorrelate even nearest-rounding errors) is biased: averaging does not help.
    nearest = {
        g: sr.gemm(g).__class__(
            *(
                s.replace(rounding="nearest") if s is not None else None
                for s in (sr.gemm(g).a, sr.gemm(g).b)
            )
        )
        for g in ("output", "grad_input", "grad_weight")
    }
    rn = sr.replace(
        name=f"{name}-rn", signs="fixed" if sr.signs == "per_call" else sr.signs, **nearest
    )
    assert _mean_wgrad_error(rn, problem, 8) > e1 / 3


def test_mxfp4_without_headroom_is_biased():
    # The reason mxfp4's gradients carry headroom 4/3: drop it and SR stops averaging out.
    problem = Problem(t=128, k=64, n=64, seed=1)
    base = recipes.get("mxfp4")
    g = base.gemm("grad_weight")
    hp = g.b.replace(format="e5m10")
    ok = base.replace(name="mxfp4-sr", grad_weight=g.__class__(g.a, hp, g.accumulate, g.chunk))
    clipped = ok.replace(
        name="mxfp4-sr-clipped",
        grad_weight=g.__class__(g.a.replace(headroom=1.0), hp, g.accumulate, g.chunk),
    )
    assert _mean_wgrad_error(ok, problem, 32) < _mean_wgrad_error(ok, problem, 1) / 4
    assert _mean_wgrad_error(clipped, problem, 32) > _mean_wgrad_error(clipped, problem, 1) / 4
