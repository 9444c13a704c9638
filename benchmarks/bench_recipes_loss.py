"""Final loss of the small transformer (lptrain/testing/tinylm.py: 2 layers, d=64, 4 heads, seq 32,
vocab 64, noisy successor-chain task) per recipe, and its ratio to FP32. Prints a markdown table.

    python benchmarks/bench_recipes_loss.py [--steps 300] [--recipes fp32,fp8-current]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

from lptrain import recipes
from lptrain.testing import tinylm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--recipes", default=",".join(recipes.names()))
    args = p.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    if "fp32" in names:
        names.remove("fp32")
    names.insert(0, "fp32")
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = (tinylm.train(name, args.steps, batch=args.batch), time.perf_counter() - t0)
        print(f"  {name}: loss {results[name][0]:.4f} ({results[name][1]:.0f} s)", flush=True)
    print()
    print(
        f"TinyLM, noisy successor chain (entropy floor ~1.58 nats), {args.steps} steps, "
        f"batch {args.batch}, AdamW 3e-3 cosine, lm_head FP32; eval loss on 256 held-out "
        f"sequences. torch "
        f"{torch.__version__}, {os.cpu_count()} CPU cores, {datetime.date.today().isoformat()}"
    )
    print()
    print("| recipe | final loss | / fp32 | train time |")
    print("|---|---|---|---|")
    ref = results["fp32"][0]
    for name, (loss, secs) in results.items():
        print(f"| {name} | {loss:.4f} | {loss / ref:.4f} | {secs:.0f} s |")


if __name__ == "__main__":
    main()
