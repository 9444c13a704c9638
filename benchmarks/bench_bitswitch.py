"""Bit-switching results table (BENCHMARKS.md): one joint run against separate LSQ runs.

    python benchmarks/bench_bitswitch.py [--work DIR] [--base-steps 150] [--steps 60]

1. pretrains a base (`recipes/pretrain/tiny-fp32.yaml`, model tiny) on the fine-tuning corpus
   `embedded:pydoc-topics` (the comparison is about precision, not domain shift; tokenizing
   the stdlib corpus would cost minutes more);
2. fine-tunes it once with `recipes/qat/bitswitch-8642.yaml` (8, 6, 4, 2 bits jointly) and
   switches it to each bit-width (`lptrain switch RUN --bits B`);
3. fine-tunes it four times with single-precision LSQ QAT at B bits (per-channel weights,
   B-bit inputs: `qat.method=lsq`, the same steps, lr and batch);
4. fine-tunes it once with `recipes/qat/bitswitch-mixed.yaml` (HASB) and switches it to the
   budgets 3 and 4.5 bits and to uniform 4 bits.
Prints the validation loss of each deployable model (the run's validation split, the same
blocks for all) and each training run's wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import cpu_model  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
BITS = (8, 6, 4, 2)
DATA = "data.path=embedded:pydoc-topics"


def lptrain(*cmd) -> tuple[str, float]:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lptrain", *map(str, cmd)], cwd=REPO, env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.monotonic() - t


def sets(*kv: str) -> list[str]:
    return [a for x in kv for a in ("--set", x)]


def train(recipe: str, run: Path, *overrides: str) -> float:
    if (run / "checkpoints" / "latest").exists():
        return float("nan")  # done by an earlier invocation (the table says so)
    _, secs = lptrain("train", REPO / "recipes" / recipe, "--run-dir", run, *sets(*overrides))
    return secs


def switched_loss(run: Path, blocks: int, *how: str) -> tuple[float, str]:
    out, _ = lptrain("switch", run, *how, "--blocks", blocks, "--out", run.parent / "tmp-switch")
    import shutil

    shutil.rmtree(run.parent / "tmp-switch")
    loss = float(re.search(r"-> \S+ ([0-9.]+)", out).group(1))
    table = "\n".join(ln for ln in out.splitlines() if ln.startswith("  layers."))
    return loss, table


def eval_loss(run: Path, blocks: int) -> float:
    out, _ = lptrain("eval", run, "--blocks", blocks)
    return float(re.search(r"val_loss ([0-9.]+)", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-bitswitch"))
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--blocks", type=int, default=64, help="validation blocks per loss")
    a = ap.parse_args()
    work = Path(a.work)
    cache = f"data.cache_dir={work / 'cache'}"
    common = [cache, DATA, f"run.max_steps={a.steps}", "run.eval_interval=0",
              "checkpoint.interval=0", "logging.progress=lines"]  # fmt: skip
    base_s = train("pretrain/tiny-fp32.yaml", work / "base", cache, DATA,
                   f"run.max_steps={a.base_steps}", "run.eval_interval=0")  # fmt: skip
    init = f"init.from={work / 'base'}"
    rows, times = {}, {}
    times["joint"] = train("qat/bitswitch-8642.yaml", work / "joint", init, *common)
    for b in BITS:
        rows[("joint", b)] = switched_loss(work / "joint", a.blocks, "--bits", str(b))[0]
        run = work / f"lsq{b}"
        times[f"lsq{b}"] = train("finetune/lsq-w4a8.yaml", run, init, *common,
                                 f"qat.weight_bits={b}", "qat.weight_granularity=channel",
                                 f"qat.act_bits={b}")  # fmt: skip
        rows[("lsq", b)] = eval_loss(run, a.blocks)
    times["hasb"] = train("qat/bitswitch-mixed.yaml", work / "hasb", init, *common)
    mixed = {}
    for label, how in (("uniform 4", ["--bits", "4"]), ("budget 4.5", ["--budget", "4.5"]),
                       ("budget 3", ["--budget", "3"])):  # fmt: skip
        mixed[label] = switched_loss(work / "hasb", a.blocks, *how)
    base_loss = eval_loss(work / "base", a.blocks)

    print(f"Machine: {cpu_model()}; {time.strftime('%Y-%m-%d')}")
    print(f"base: tiny fp32 {a.base_steps} steps; fine-tunes {a.steps} steps x 16 x 128 tokens "
          f"on embedded:pydoc-topics, ZeRO-2, 1 process; loss on {a.blocks} val blocks; "
          f"base before fine-tuning {base_loss:.4f}\n")  # fmt: skip
    print("| bits | one joint run (switched) | separate LSQ run | joint - separate |")
    print("| ---: | ---: | ---: | ---: |")
    for b in BITS:
        j, s = rows[("joint", b)], rows[("lsq", b)]
        print(f"| {b} | {j:.4f} | {s:.4f} | {j - s:+.4f} |")
    sep = sum(times[f"lsq{b}"] for b in BITS)
    each = ", ".join(f"{b}: {times['lsq' + str(b)]:.0f}" for b in BITS)
    print(f"\ntraining time: joint {times['joint']:.0f} s, four separate {sep:.0f} s "
          f"({each}); HASB {times['hasb']:.0f} s; base {base_s:.0f} s\n")  # fmt: skip
    print("| HASB model | val loss |")
    print("| --- | ---: |")
    for label, (loss, _) in mixed.items():
        print(f"| {label} | {loss:.4f} |")
    for label in ("budget 4.5", "budget 3"):
        print(f"\n{label}:\n{mixed[label][1]}")


if __name__ == "__main__":
    main()
