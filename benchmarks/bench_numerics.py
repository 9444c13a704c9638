"""ns per element of the lptrain.numerics quantizers on 16M fp32 elements (CPU).

Each row is compared, in the same run, with torch's own cast `x.to(torch.float8_e4m3fn).float()`,
with `x.clone()` (memory bandwidth), and with pychop (torch backend; RNE = rmode 1, stochastic =
rmode 5) where installed. Times are medians of several repeats. Prints a markdown table.

    python benchmarks/bench_numerics.py [--n 16777216] [--repeats 5] [--pychop-n 1048576]

pychop's E2M1 is IEEE-like (a different grid), timed only as the reference simulator's cost.
Targets (issue 2): nearest FP8 <= 3x torch's cast, stochastic <= 6x, >= 10x faster than pychop.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
from machine import cpu_model

from lptrain.numerics import QuantSpec, dfp_quantize, fake_quantize, hadamard, round_to_format


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--pychop-n",
        type=int,
        default=1 << 20,
        help="pychop is slow: time it on this many elements (ns/element is reported)",
    )
    args = ap.parse_args()
    n = args.n
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * 4
    gen = torch.Generator().manual_seed(1)

    def ns(fn, count=n):
        return _median_time(fn, args.repeats) / count * 1e9

    base_cast = ns(lambda: x.to(torch.float8_e4m3fn).float())
    base_clone = ns(lambda: x.clone())

    mx8 = QuantSpec("fp8_e4m3", scaling="block", block_size=32, scale_format="e8m0")
    mx4 = QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0")
    nv4 = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")
    x2 = x.reshape(-1, 4096)
    rows = [
        ("round_to_format fp8_e4m3 nearest", lambda: round_to_format(x, "fp8_e4m3"), (4, 3, 1)),
        (
            "round_to_format fp8_e4m3 stochastic",
            lambda: round_to_format(x, "fp8_e4m3", "stochastic", generator=gen),
            (4, 3, 5),
        ),
        ("round_to_format fp4_e2m1 nearest", lambda: round_to_format(x, "fp4_e2m1"), (2, 1, 1)),
        (
            "round_to_format fp4_e2m1 stochastic",
            lambda: round_to_format(x, "fp4_e2m1", "stochastic", generator=gen),
            (2, 1, 5),
        ),
        ("MXFP8 block quantize (fake_quantize)", lambda: fake_quantize(x2, mx8), None),
        ("MXFP4 block quantize (fake_quantize)", lambda: fake_quantize(x2, mx4), None),
        ("NVFP4 quantize (fake_quantize)", lambda: fake_quantize(x2, nv4), None),
        ("Hadamard(32)", lambda: hadamard(x2, 32), None),
        ("DFP16 quantize", lambda: dfp_quantize(x), None),
    ]
    try:
        import pychop

        pychop.backend("torch")
    except Exception:  # pychop is optional
        pychop = None

    xs = x[: args.pychop_n].clone()
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (torch threads "
        f"{torch.get_num_threads()}); torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}; n = {n} fp32 elements, median of {args.repeats}.",
        f"Baselines: torch cast `x.to(torch.float8_e4m3fn).float()` = {base_cast:.2f} ns/elem, "
        f"`x.clone()` = {base_clone:.2f} ns/elem.",
        "",
        "| operation | ns/elem | x torch fp8 cast | x clone "
        "| pychop ns/elem | speed-up vs pychop |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, fn, chop in rows:
        t = ns(fn)
        pc = sp = "n/a"
        if chop is not None and pychop is not None:
            e, m, rmode = chop  # pychop sig_bits = fraction bits (1.xxx)
            c = pychop.Chop(exp_bits=e, sig_bits=m, rmode=rmode)
            tp = _median_time(lambda c=c: c(xs), max(1, args.repeats // 2)) / xs.numel() * 1e9
            pc, sp = f"{tp:.1f}", f"{tp / t:.0f}x"
        lines.append(
            f"| {name} | {t:.2f} | {t / base_cast:.2f} | {t / base_clone:.2f} | {pc} | {sp} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
