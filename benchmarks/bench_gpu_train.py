"""Tokens/s of the ~1B pretraining recipe on one GPU, FP8 against BF16, measured in the same run;
prints a markdown table for BENCHMARKS.md.

usage: python benchmarks/bench_gpu_train.py [--steps 200] [--recipes fp8-rowwise,...]

Each recipe runs `lptrain train recipes/pretrain/gpu-1b-fp8.yaml --set precision.recipe=...`
in its own process on the embedded corpus (byte tokenizer, 2048-token blocks, micro-batch 8,
no gradient accumulation, checkpoints and evaluation off), `backend: auto`. Throughput is the
median of the logged `tokens_per_s` rows after the first quarter of the steps (compilation,
the backend's self-test and allocator warm-up excluded). Target (issue 14): FP8 >= 1.2x BF16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/pretrain/gpu-1b-fp8.yaml"


def run_one(recipe: str, steps: int, workdir: Path) -> dict:
    run_dir = workdir / recipe
    sets = [
        f"precision.recipe={recipe}",
        f"run.max_steps={steps}",
        "run.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.save_final=false",
        "checkpoint.resume=none",
        "deepspeed.grad_accum=1",
        "logging.interval=10",
        "logging.progress=lines",
        "logging.wandb.mode=disabled",
    ]
    cmd = [sys.executable, "-m", "lptrain", "train", str(RECIPE), "--run-dir", str(run_dir)]
    cmd += [a for kv in sets for a in ("--set", kv)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > steps // 4]
    backend = next((ln for ln in (proc.stdout + proc.stderr).splitlines() if "convert:" in ln), "")
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "loss": rows[-1]["loss"],
        "backend": backend.split("(backend ", 1)[-1].split(":", 1)[0] if backend else "-",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--recipes", default="fp8-rowwise", help="compared with bf16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device (this benchmark measures GPU training)", file=sys.stderr)
        return 2
    names = ["bf16"] + [n for n in args.recipes.split(",") if n and n != "bf16"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                results[name] = run_one(name, args.steps, Path(tmp))
            except RuntimeError as exc:
                results[name] = {"error": str(exc).splitlines()[0]}
            print(f"{name}: {results[name]}", file=sys.stderr)
    p = torch.cuda.get_device_properties(0)
    base = results["bf16"].get("tokens_per_s")
    lines = [
        f"### 1B pretraining recipe, tokens/s ({datetime.date.today().isoformat()})",
        "",
        f"GPU: {p.name} (sm_{p.major}{p.minor}), torch {torch.__version__}; "
        f"recipes/pretrain/gpu-1b-fp8.yaml, {args.steps} steps of 8 x 2048 tokens, ZeRO-2 "
        "bf16, one GPU; median tokens/s after the first quarter of the steps.",
        "",
        "| recipe | backend | tokens/s | vs bf16 | loss at the last step |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | {r['error']} | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['backend']} | {r['tokens_per_s']:.0f} | {ratio} | {r['loss']:.3f} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
