"""Bias of stochastically rounded FP4 gradients: NVFP4 with TE's RNE block scales against
`scale_rounding: ceil` (never clips). Prints a markdown table.

For each variant: the fraction of grad_output elements that clip, and the relative error of the
mean of N draws of dX and dW against float64 (an unbiased estimator falls like 1/sqrt(N); a
biased one stalls at its bias). Only the stochastic operands stay FP4, the others are made
near-lossless (e5m10 elements, FP32 scales) so that their deterministic error does not hide
the bias.

    python benchmarks/bench_sr_bias.py [--draws 1024]
"""

from __future__ import annotations

import argparse
import datetime

import torch
from machine import cpu_model

from lptrain import recipes
from lptrain.numerics import fake_quantize
from lptrain.testing import Problem


def variant(base: str, scale_rounding: str | None):
    r = recipes.get(base)
    gemms = {}
    for g in ("output", "grad_input", "grad_weight"):
        gr = r.gemm(g)
        specs = []
        for s in (gr.a, gr.b):
            if s is not None and s.rounding == "stochastic":
                s = s.replace(scale_rounding=scale_rounding)
            elif s is not None:  # near-lossless: e5m10, and FP32 scales (a rounded-down
                # UE4M3 scale would clip block maxima of this operand too)
                s = s.replace(format="e5m10")
                if s.two_level:
                    s = s.replace(scale_format="fp32", scale_rounding=None)
            specs.append(s)
        gemms[g] = type(gr)(specs[0], specs[1], gr.accumulate, gr.chunk, gr.overflow)
    return r.replace(name=f"{base}-{scale_rounding or 'te'}", **gemms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=1024)
    args = p.parse_args()
    prob = Problem(t=256, k=256, n=128, seed=3)
    checkpoints = [1, 16, args.draws]
    print(f"machine: {cpu_model()}; {datetime.date.today()}; torch {torch.__version__}\n")
    head = " | ".join(f"dX err, {n}" for n in checkpoints) + " | "
    head += " | ".join(f"dW err, {n}" for n in checkpoints)
    print(f"| variant | grad_output clipped | {head} |")
    print("|" + " --- |" * (2 + 2 * len(checkpoints)))
    for base in ("nvfp4", "fp4-ue5m3"):
        for sr in (None, "ceil"):
            r = variant(base, sr)
            spec = r.grad_input.a
            st = fake_quantize(prob.dy, spec, generator=torch.Generator().manual_seed(0),
                               with_stats=True)[1]["stats"]  # fmt: skip
            lin = prob.layer(r, seed=7)
            acc_x = torch.zeros_like(prob.dx_ref)
            acc_w = torch.zeros_like(prob.dw_ref)
            ex, ew = [], []
            for i in range(1, args.draws + 1):
                _, dx, dw = prob.run(lin)
                acc_x += dx.double()
                acc_w += dw.double()
                if i in checkpoints:
                    ex.append(float((acc_x / i - prob.dx_ref).norm() / prob.dx_ref.norm()))
                    ew.append(float((acc_w / i - prob.dw_ref).norm() / prob.dw_ref.norm()))
            cells = " | ".join(f"{e:.4f}" for e in ex + ew)
            print(f"| {base} scale_rounding {sr or 'nearest (TE)'} | "
                  f"{float(st.saturated):.2%} | {cells} |")  # fmt: skip


if __name__ == "__main__":
    main()
