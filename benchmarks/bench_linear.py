"""fwd+bwd time of lptrain.nn.Linear per recipe on CPU, as a ratio to nn.Linear (FP32) and to
torchao's emulated Float8Linear, measured in the same run. Prints a markdown table.

    python benchmarks/bench_linear.py [--repeats 3] [--recipes fp8-current,nvfp4] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import time
import warnings

import torch
from machine import cpu_model
from torch import nn

import lptrain
import lptrain.nn
from lptrain import recipes

SHAPES = ((2048, 1024, 1024), (4096, 2048, 2048))  # (tokens, in, out)
STATS_RECIPE = "fp8-current"


def time_fwd_bwd(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward (after one warm-up call)."""

    def once():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).backward(dy)

    once()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def torchao_emulated(base: nn.Module) -> nn.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except Exception:  # noqa: BLE001 - torchao is optional
        return None
    return convert_to_float8_training(copy.deepcopy(base), config=Float8LinearConfig(emulate=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recipes", default=",".join(n for n in recipes.names() if n != "bf16"))
    p.add_argument("--quick", action="store_true", help="only the first shape")
    args = p.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows: dict[str, list[str]] = {}
    base_times = {}
    for t, k, n in shapes:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(k, n))
        x = torch.randn(t, k, requires_grad=True)
        dy = torch.randn(t, n)
        ref = time_fwd_bwd(base, x, dy, args.repeats)
        ao_model = torchao_emulated(base)
        ao = time_fwd_bwd(ao_model, x, dy, args.repeats) if ao_model is not None else float("nan")
        base_times[(t, k, n)] = (ref, ao)
        rows.setdefault("torchao Float8Linear (emulate)", []).append(
            f"{ao * 1e3:.0f} ms · {ao / ref:.2f}x · 1.00x"
        )
        for name in names:
            m = lptrain.convert(copy.deepcopy(base), name)
            s = time_fwd_bwd(m, x, dy, args.repeats)
            rows.setdefault(name, []).append(f"{s * 1e3:.0f} ms · {s / ref:.2f}x · {s / ao:.2f}x")
            print(f"  {(t, k, n)} {name}: {s * 1e3:.1f} ms", flush=True)
        # The cost of statistics (amax, scale, saturation, underflow, SQNR per operand per
        # GEMM) collected on every step, the most expensive setting.
        m = lptrain.convert(copy.deepcopy(base), STATS_RECIPE)
        lptrain.nn.collect_stats(m, every=1)
        s = time_fwd_bwd(m, x, dy, args.repeats)
        label = f"{STATS_RECIPE} + stats every step"
        rows.setdefault(label, []).append(f"{s * 1e3:.0f} ms · {s / ref:.2f}x · {s / ao:.2f}x")

    print()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); "
        f"torch {torch.__version__}; {datetime.date.today().isoformat()}; median of "
        f"{args.repeats} fwd+bwd after one warm-up"
    )
    print()
    head = " | ".join(f"({t}, {k}, {n}): time · vs nn.Linear · vs torchao" for t, k, n in shapes)
    print(f"| recipe | {head} |")
    print("|---|" + "---|" * len(shapes))
    ref_cells = " | ".join(
        f"{base_times[s][0] * 1e3:.0f} ms · 1.00x · {base_times[s][0] / base_times[s][1]:.2f}x"
        for s in shapes
    )
    print(f"| nn.Linear (fp32) | {ref_cells} |")
    for name, cells in rows.items():
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
