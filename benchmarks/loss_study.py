"""The loss study: which precision recipes train as well as fp32 on the real corpus, with the
seed spread that says whether a gap means anything, and the seed papers' claims re-run on the
same setup. Prints markdown tables for BENCHMARKS.md and draws the README's plot.

    python benchmarks/loss_study.py                  # suite main: every recipe x seeds 0,1,2
    python benchmarks/loss_study.py --suite claims   # FP4 Hadamard/SR/UE5M3, INT32 overflow
    python benchmarks/loss_study.py --suite lr       # learning-rate sweep, fp32/FP8/FP4
    python benchmarks/loss_study.py --suite ci       # the CI test's setup, 5 seeds: its bounds
    python benchmarks/loss_study.py --suite mainjob  # the issue's setup (tiny, warmup 20)
    python benchmarks/loss_study.py --suite ci --set data.block_size=256   # a candidate setup
    python benchmarks/loss_study.py --suite claims8 --jobs 2   # the claims at 8x (STUDY8)
    python benchmarks/loss_study.py --suite claims8 --base recipes/pretrain/gpu-125m-fp8.yaml
    python benchmarks/loss_study.py --suite all --jobs 2   # every suite but claims8; 2 at a time

Each run is `lptrain train recipes/pretrain/tiny-fp32.yaml` with the overrides of
`lptrain.testing.study` (STUDY, STUDY8 or CI) plus the recipe and seed (`--base` RECIPE: the
claims8 suite on that run file's own model, data and learning rate instead, e.g. at GPU
scale), in its own process with one torch thread (the losses are then bit-for-bit
reproducible on one machine, and two jobs use two cores better than one job with two threads:
the nano model's GEMMs are too small to split).
Results are cached per run in OUT/results/*.json under a hash of the full command, so an
interrupted study resumes and `--report` reprints the tables without training.
Cost, measured on a quiet 2-core machine with `--jobs 2` (BENCHMARKS.md, "Loss study"): a run
at the study setup takes 20 s (fp32) to 190 s (quartet); every recipe x 3 seeds is 63 minutes of
one core, 32 minutes of wall time; `--suite claims` adds 18 minutes and `--suite lr` 13.
`--suite claims8` (33 runs: 40-120 s for fp32, 4-9 minutes for an FP4 recipe) took 62 minutes
with `--jobs 2` on a machine shared with three other sessions. Tokens/s are only meaningful on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from loss_study_report import report
from machine import cpu_model

from lptrain import recipes
from lptrain.config.schema import load
from lptrain.errors import ConfigError
from lptrain.testing.study import (
    BASE_RECIPE,
    CI,
    QUIET,
    STUDY,
    STUDY8,
    recipe_overrides,
    val_curve,
)

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
SUITES = ("main", "claims", "lr", "ci", "mainjob")  # the nano study's: --suite all
CI_SEEDS = (0, 1, 2, 3, 4)


def _ops(**fields) -> dict:
    """The same field overrides on every operand of every GEMM."""
    return {g: {op: dict(fields) for op in ops} for g, ops in recipes.GEMMS.items()}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _variant(name: str, base: str, *changes: dict) -> dict:
    """An inline recipe: `base` with field overrides (from_dict keeps every other field)."""
    d = {"base": base, "name": name}
    for c in changes:
        d = _merge(d, c)
    return d


_NO_HADAMARD = _ops(hadamard=None, hadamard_signs=False)
_NEAREST_GRADS = {
    g: {"grad_output": {"rounding": "nearest"}} for g in ("grad_input", "grad_weight")
}
_WRAP = {g: {"overflow": "wrap"} for g in recipes.GEMMS}

# The claims' recipes, each one change (or two) away from a named recipe.
VARIANTS: dict[str, dict] = {
    v["name"]: v
    for v in (
        _variant("fp4-ue5m3-no-hadamard", "fp4-ue5m3", _NO_HADAMARD),
        _variant("fp4-ue5m3-nearest-grads", "fp4-ue5m3", _NEAREST_GRADS),
        _variant("fp4-ue5m3-no-hadamard-nearest-grads", "fp4-ue5m3", _NO_HADAMARD, _NEAREST_GRADS),
        _variant("fp4-ue5m3-e4m3-scales", "fp4-ue5m3", _ops(scale_format="ue4m3")),
        _variant("int16-dfp-wrap", "int16-dfp", _WRAP),
        # TE's start of delayed scaling (scale 1 until the history has an amax), which was the
        # default before the hardening issue: the first step's gradients underflow in E5M2.
        _variant("fp8-delayed-init-one", "fp8-delayed", _ops(delayed_init="one")),
    )
}

STUDY_LR = 3e-3  # optim.lr in STUDY
LRS = (1.5e-3, STUDY_LR, 6e-3, 1.2e-2, 2.4e-2)
LR_RECIPES = ("fp32", "fp8-delayed", "nvfp4")
LR_SEEDS = (0, 1)  # two seeds per point: a divergence shows in either
# The CI test's recipes (mxfp4: the FP4 recipe it must tell from FP8; nvfp4 was, until MKL's
# AVX2 kernels put it as close to fp32 as FP8), plus controls: the INT32 wrap-around the issue
# found, and recipes whose gradients are noisier than FP8's, to show where the test's bounds
# sit between.
CI_RECIPES = ("fp32", "bf16", "int16-dfp", "fp8-delayed", "fp8-current", "nvfp4",
              "int16-dfp-wrap", "fp8-delayed-init-one", "mxfp6", "mxfp4")  # fmt: skip
# The issue's own measurement: recipes/pretrain/tiny-fp32.yaml with only the recipe and the
# seed changed (tiny model, 300 steps, warmup 20), with the two suspects the issue names as
# variants, and the same with warmup 100.
JOB_RECIPES = ("fp32", "bf16", "int16-dfp", "fp8-delayed", "fp8-current", "nvfp4",
               "int16-dfp-wrap", "fp8-delayed-init-one")  # fmt: skip
JOB_W100_RECIPES = ("fp32", "fp8-delayed", "fp8-current")
# The claims at 8x (STUDY8, or a --base run file): the reference, both FP8 scalings, and
# fp4-ue5m3 with each claim's one change, in this order (the reference first: every pair
# needs it); then the learning-rate sweep at 3x and 8x the setup's rate (1x: the claims' runs),
# fp32 (or bf16), FP8 and FP4 at two seeds, where "To FP8 and Back Again" reports low precision
# losing stability first.
CLAIMS8_RECIPES = ("fp32", "fp8-delayed", "fp8-current", "fp4-ue5m3", "fp4-ue5m3-no-hadamard",
                   "fp4-ue5m3-nearest-grads", "fp4-ue5m3-e4m3-scales")  # fmt: skip
LR8_MULTS = (3, 8)
LR8_RECIPES = ("fp32", "fp8-delayed", "fp4-ue5m3")
LR8_SEEDS = (0, 1)  # those of them in --seeds: more seeds for the claims add no sweep runs


@dataclass(frozen=True)
class Run:
    label: str  # the row it belongs to: a recipe name, a variant, or "<recipe>@lr<lr>"
    recipe: str | dict
    seed: int
    setup: tuple[str, ...] = STUDY
    extra: tuple[str, ...] = field(default=())
    base: str = BASE_RECIPE  # the run file the overrides apply to

    def overrides(self) -> list[str]:
        seed = f"run.seed={self.seed}"
        return [*QUIET, *self.setup, *recipe_overrides(self.recipe), seed, *self.extra]

    def command(self) -> list[str]:
        """`lptrain train` with everything but the run directory and the data cache."""
        cmd = [sys.executable, "-m", "lptrain", "train", str(REPO / self.base)]
        return cmd + [a for kv in self.overrides() for a in ("--set", kv)]

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"

    @property
    def key(self) -> str:
        # The default run file stays out of the hash: the nano study's cached results keep
        # their keys.
        what = self.overrides() + ([self.base] if self.base != BASE_RECIPE else [])
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _recipe(label: str) -> str | dict:
    return VARIANTS.get(label, label)


def _recipe_of(run: Run) -> str:
    """The recipe of a run's label: 'ci:fp32', 'job:fp32', 'fp32@lr0.006' -> 'fp32'."""
    return run.label.split(":")[-1].split("@")[0]


def _lr_run(label: str, lr: float, seed: int) -> Run:
    return Run(f"{label}@lr{lr:g}", _recipe(label), seed, extra=(f"optim.lr={lr}",))


@dataclass(frozen=True)
class Claims8:
    """Where the claims8 suite runs: STUDY8 on the default run file (base None), or the run file
    `base` as it stands (its own model, data and learning rate), e.g. a GPU recipe."""

    setup: tuple[str, ...]
    path: str  # the run file
    prefix: str  # of every label: the results of two bases never mix
    lr: float  # the setup's learning rate: the sweep's 1x
    # fp32, or bf16 where the run file trains in DeepSpeed bf16 (fp32 layers under a bf16
    # engine would be bf16 under fp32's name)
    ref: str

    @classmethod
    def of(cls, base: str | None) -> Claims8:
        setup, path = (STUDY8, BASE_RECIPE) if base is None else ((), base)
        cfg = load(REPO / path, list(setup))
        ref = "bf16" if cfg.deepspeed.dtype == "bf16" else "fp32"
        prefix = "s8:" if base is None else f"{Path(base).stem}:"
        return cls(setup, path, prefix, cfg.optim.lr, ref)

    def name(self, recipe: str) -> str:
        return self.ref if recipe == "fp32" else recipe

    def lr_grid(self) -> tuple[list[float], list[str], float]:
        """(learning rates, recipes, the 1x rate): the report's sweep table."""
        lrs = [float(f"{self.lr * m:g}") for m in (1, *LR8_MULTS)]
        return lrs, [self.name(r) for r in LR8_RECIPES], self.lr


def claims8_runs(seeds: tuple[int, ...], base: str | None = None) -> list[Run]:
    """The claims8 suite (Claims8), seed-major so that an interrupted study has whole seeds of
    every pair, then the learning-rate sweep."""
    c = Claims8.of(base)

    def run(recipe: str, seed: int, mult: int = 1) -> Run:
        name = c.name(recipe)
        if mult == 1:
            return Run(c.prefix + name, _recipe(name), seed, c.setup, base=c.path)
        lr = f"{c.lr * mult:g}"
        extra = (f"optim.lr={lr}",)
        return Run(f"{c.prefix}{name}@lr{lr}", _recipe(name), seed, c.setup, extra, base=c.path)

    claims = [run(lb, s) for s in seeds for lb in CLAIMS8_RECIPES]
    # seed by seed, the highest rate first: where a narrower stable range would show
    lr_seeds = [s for s in seeds if s in LR8_SEEDS]
    lrs = [run(lb, s, m) for s in lr_seeds for m in LR8_MULTS[::-1] for lb in LR8_RECIPES]
    return claims + lrs


def suite_runs(
    suite: str, seeds: tuple[int, ...], only: list[str] | None, base: str | None = None
) -> list[Run]:
    if suite == "main":
        labels = only or recipes.names()
        return [Run(lb, _recipe(lb), s) for lb in labels for s in seeds]
    if suite == "claims":
        labels = ["fp32", "int16-dfp", "fp8-delayed", "fp8-current", "fp4-ue5m3", *VARIANTS]
        return [Run(lb, _recipe(lb), s) for lb in labels for s in seeds]
    if suite == "lr":
        # The study's own learning rate is the main suite's run (same command, same cache).
        return [
            Run(lb, _recipe(lb), s) if lr == STUDY_LR else _lr_run(lb, lr, s)
            for lb in LR_RECIPES
            for lr in LRS
            for s in LR_SEEDS
        ]
    if suite == "mainjob":
        w100 = ("optim.warmup_steps=100",)
        return [Run(f"job:{lb}", _recipe(lb), s, setup=()) for lb in JOB_RECIPES for s in seeds] + [
            Run(f"job-w100:{lb}", lb, s, setup=w100) for lb in JOB_W100_RECIPES for s in seeds
        ]
    if suite == "ci":
        return [Run(f"ci:{lb}", _recipe(lb), s, setup=CI) for lb in CI_RECIPES for s in CI_SEEDS]
    if suite == "claims8":
        return claims8_runs(seeds, base)
    raise ValueError(suite)


def suite_runs_of(
    suites: list[str], seeds: tuple[int, ...], only: list[str] | None, base: str | None = None
) -> list[Run]:
    """Every run of `suites`, once each, in order (`only`: these recipes' runs, in this order)."""
    runs = list({r.name: r for s in suites for r in suite_runs(s, seeds, only, base)}.values())
    if only:  # the main job's warmup-100 runs last
        runs = [r for r in runs if _recipe_of(r) in only]
        runs.sort(key=lambda r: (r.label.startswith("job-w100:"), only.index(_recipe_of(r))))
    return runs


def with_sets(runs: list[Run], sets: list[str]) -> list[Run]:
    """`runs` with the `--set` overrides `sets` after each run's own: a candidate setup (e.g. the
    CI test's at another block size or learning rate), each run paired as in its suite."""
    return [replace(r, extra=(*r.extra, *sets)) for r in runs]


def execute(run: Run, out: Path, cache_dir: str | None) -> dict:
    """Train one run in a child process (or reuse its cached result) and summarize it."""
    saved = out / "results" / f"{run.name}.json"
    if saved.exists():
        res = json.loads(saved.read_text())
        if res.get("key") == run.key:
            return res
    run_dir = out / "runs" / run.name
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cmd = run.command() + ["--run-dir", str(run_dir)]
    cmd += ["--set", f"data.cache_dir={cache_dir}"] if cache_dir else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # DeepSpeed JIT-builds its CPU shared-memory op per extensions dir and rebuilds it whenever
    # another install's sources were built there last: a private dir keeps the build (30-60 s).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(out / "torch_extensions"))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 1):  # 2: a bad recipe (a bug here); anything else: a crash
        raise RuntimeError(f"{run.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = summarize(run, rows, wall, diverged=proc.returncode == 1)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(res, indent=1) + "\n")
    return res


def summarize(run: Run, rows: list[dict], wall: float, diverged: bool) -> dict:
    train = [r for r in rows if "loss" in r]
    per_step = train[0]["tokens"] // train[0]["step"] if train else 0
    curve = [(step, step * per_step, v) for step, v in val_curve(rows)]
    rates = [r["tokens_per_s"] for r in train[1:]]  # the first row includes start-up
    return {
        "key": run.key,
        "label": run.label,
        "seed": run.seed,
        "overrides": run.overrides(),
        "curve": curve,
        "final": curve[-1][2] if curve and not diverged else float("nan"),
        "diverged": diverged,
        "skipped_steps": train[-1]["skipped_steps"] if train else 0,
        "tokens_per_s": statistics.median(rates) if rates else float("nan"),
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="main", choices=[*SUITES, "claims8", "all"])
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated")
    ap.add_argument("--recipes", default=None, help="comma-separated subset, run in this order")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--out", default=str(REPO / "runs" / "loss-study"))
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir for every run")
    ap.add_argument("--base", default=None, help="claims8 only: a run file instead of STUDY8")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="an override after each run's own (repeatable): a candidate setup",
    )  # fmt: skip
    ap.add_argument("--plot", default=None, help="default docs/loss_study[_8x].png")
    ap.add_argument("--report", action="store_true", help="tables from cached results only")
    args = ap.parse_args()
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    only = args.recipes.split(",") if args.recipes else None
    known = {*recipes.names(), *VARIANTS}
    unknown = [r for r in only or () if r not in known]
    if unknown:
        ap.error(f"--recipes: unknown {', '.join(unknown)} (named recipes and {sorted(VARIANTS)})")
    if args.base is not None and args.suite != "claims8":
        ap.error(f"--base: only the claims8 suite takes a run file (got --suite {args.suite})")
    if args.base is not None and not (REPO / args.base).is_file():
        ap.error(f"--base: no such run file {args.base}")
    try:
        load(REPO / (args.base or BASE_RECIPE), args.sets)
    except ConfigError as e:
        ap.error(str(e))  # names the key (or "--set" for a malformed one)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    runs = with_sets(suite_runs_of(suites, seeds, only, args.base), args.sets)
    out = Path(args.out)
    if args.sets:  # a candidate's runs have the suite's names: its results go apart
        out /= "set-" + hashlib.sha256(json.dumps(args.sets).encode()).hexdigest()[:8]
    t0 = time.monotonic()
    if args.report:
        results = [
            json.loads(p.read_text())
            for r in runs
            if (p := out / "results" / f"{r.name}.json").exists()
        ]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(execute, r, out, args.cache_dir) for r in runs]
            results = []
            for r, f in zip(runs, futures, strict=True):
                results.append(f.result())
                res = results[-1]
                print(f"{r.name}: val {res['final']:.4f}, {res['wall_s']:.0f} s", file=sys.stderr)
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread "
        f"per run, {args.jobs} run(s) at a time; {datetime.date.today().isoformat()}; "
        f"this invocation {time.monotonic() - t0:.0f} s, training time of these runs "
        f"{sum(r['wall_s'] for r in results):.0f} s.\n"
    )
    png = "loss_study_8x.png" if suites == ["claims8"] else "loss_study.png"
    plot = Path(args.plot or REPO / "docs" / png) if {"main", "claims8"} & {*suites} else None
    c8 = Claims8.of(args.base) if "claims8" in suites else None
    claims8 = (c8.prefix, c8.ref, c8.lr_grid()) if c8 else None
    print(report(results, suites, plot, (LRS, LR_RECIPES, STUDY_LR), claims8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
