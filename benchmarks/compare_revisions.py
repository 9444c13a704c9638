"""Is a change slower? Linear fwd+bwd and trainer tokens/s of two git revisions, same run.

    python benchmarks/compare_revisions.py BASE_REV [NEW_REV] [--rounds 3] [--steps 40]
        [--recipes nvfp4,quartet] [--train fp32,nvfp4]   # --train "": Linear only

NEW_REV defaults to the working tree. Each revision is checked out into a temporary worktree;
every measurement runs in a child process that imports that revision's lptrain, and the two
revisions alternate round by round (ABBA) so that load from other processes hits both alike.
Three repeats per child were too few on this 2-core machine: two revisions with the same
operations differed by up to 20% (BENCHMARKS.md, "Architecture refactor"). Each child also
times plain nn.Linear, so each cell is a ratio to a baseline measured in the same process; the
table puts the two revisions' ratios side by side with their quotient.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_train import run_one
from machine import cpu_model

from lptrain import recipes

REPO = Path(__file__).resolve().parents[1]
SHAPE = (2048, 1024, 1024)  # tokens, in, out
RECIPES = ["fp8-delayed", "fp8-current", "fp8-rowwise", "fp8-block", "mxfp8", "mxfp4",
           "nvfp4", "quartet", "fp4-ue5m3", "int16-dfp"]  # fmt: skip
TRAIN = ["fp32", "fp8", "nvfp4", "int16-dfp"]

CHILD = r"""
import json, statistics, sys, time, copy, torch
from torch import nn
import lptrain
t, k, n, repeats = map(int, sys.argv[1:5])
names = [n for n in sys.argv[5].split(",") if n]
torch.manual_seed(0)
base = nn.Sequential(nn.Linear(k, n))
x = torch.randn(t, k, requires_grad=True)
dy = torch.randn(t, n)
def clock(m):
    def once():
        x.grad = None
        m.zero_grad(set_to_none=True)
        m(x).backward(dy)
    once()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); once(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
out = {"nn.Linear": clock(base)}
for name in names:
    out[name] = clock(lptrain.convert(copy.deepcopy(base), name)) / out["nn.Linear"]
print(json.dumps(out))
"""


def worktree(rev: str, tmp: Path) -> Path:
    path = tmp / rev.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), rev], cwd=REPO,
                   check=True)  # fmt: skip
    return path


def linear_ratios(tree: Path, repeats: int, names: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [*map(str, SHAPE), str(repeats), ",".join(names)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("new", nargs="?", default=None, help="default: the working tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=8, help="timed fwd+bwd per recipe and child")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="Linear recipes")
    ap.add_argument("--train", default=",".join(TRAIN), help="trainer recipes ('': none)")
    args = ap.parse_args()
    names = [n for n in args.recipes.split(",") if n]
    train = [n for n in args.train.split(",") if n]
    unknown = [n for n in names if n not in recipes.names()]
    if unknown:
        ap.error(f"--recipes: unknown recipe(s) {unknown} (known: {', '.join(recipes.names())})")
    missing = [n for n in train if not (REPO / f"recipes/pretrain/tiny-{n}.yaml").is_file()]
    if missing:
        ap.error(f"--train: no recipes/pretrain/tiny-<name>.yaml for {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {args.base: worktree(args.base, tmp)}
        new = args.new or "working tree"
        trees[new] = worktree(args.new, tmp) if args.new else REPO
        lin = {rev: [] for rev in trees}
        tps = {rev: {name: [] for name in train} for rev in trees}
        try:
            if train:
                run_one("fp32", 6, tmp / "warmup", repo=REPO)  # builds the data cache unmeasured
            for r in range(args.rounds):
                # ABBA: each revision goes first in every other round, so a drift of the
                # machine's speed within a round does not favour one of them.
                order = list(trees.items())[:: 1 if r % 2 == 0 else -1]
                for rev, tree in order:
                    lin[rev].append(linear_ratios(tree, args.repeats, names))
                    for name in train:
                        res = run_one(name, args.steps, tmp / f"{r}-{len(lin[rev])}", repo=tree)
                        tps[rev][name].append(res["tokens_per_s"])
                    print(f"round {r + 1}: {rev} done", file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
    a, b = trees
    when = datetime.date.today().isoformat()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; {when}; "
          f"{args.rounds} alternating rounds, medians\n")  # fmt: skip
    print(f"| Linear fwd+bwd {SHAPE}, time / nn.Linear | {a} | {b} | {b} / {a} |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        ra = statistics.median(x[name] for x in lin[a])
        rb = statistics.median(x[name] for x in lin[b])
        print(f"| {name} | {ra:.2f}x | {rb:.2f}x | {rb / ra:.2f} |")
    if not train:
        return 0
    print(f"\n| trainer, tokens/s ({args.steps} steps) | {a} | {b} | {b} / {a} |")
    print("| --- | ---: | ---: | ---: |")
    for name in train:
        ta, tb = statistics.median(tps[a][name]), statistics.median(tps[b][name])
        print(f"| tiny-{name} | {ta:.0f} | {tb:.0f} | {tb / ta:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
