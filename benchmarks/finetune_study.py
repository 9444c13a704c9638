"""L4Q against QLoRA + post-training quantization, after deployment, at the study's model size.

    python benchmarks/finetune_study.py [--work DIR] [--jobs 2] [--base-steps 400] [--steps 200]
    python benchmarks/finetune_study.py --report      # the tables from cached results only

The L4Q paper's claim (Jeon et al. 2024): training the quantizer with the adapter (L4Q) gives a
better *deployed* 4-bit model than QLoRA followed by quantizing the merged model. Here:
1. one fp32 base at the larger study's model size (STUDY8: `recipes/pretrain/tiny-fp32.yaml`
   with 4 layers instead of 2, ~10x the nano model of the first study), pretrained on the
   embedded stdlib corpus;
2. fine-tuned on `embedded:pydoc-topics` with `recipes/finetune/l4q-4bit.yaml` and with
   `qlora-int4.yaml` at seeds 0, 1, 2 (same seed: same batches and the same draw of A);
3. each run exported (`lptrain export`) and the export evaluated (`lptrain eval EXPORT`): the
   deployable model's loss on the run's validation split (all 72 blocks).

"QLoRA+PTQ" is what the project deploys for QLoRA: the export merges W + B·A over the
dequantized int4 base and rounds the merged weight to int4 (symmetric, round to nearest, one
fp32 step per 64 inputs): post-training quantization by round-to-nearest into the format the
base was stored in. L4Q deploys its own trained 4-bit codes with a step and an offset per 64
inputs (0.625 vs 0.5625 bytes per weight). No other 4-bit PTQ (GPTQ, AWQ) exists here, and no
3-bit LoRA base, so the 3-bit pair has no QLoRA side.

Each run's result is cached in WORK/results/NAME.json under a hash of its commands (and the
base's), so an interrupted study resumes; a run without a result is started again from scratch.
Each setting (--steps, --set) has runs and results of its own; all share the one base.
Cost on the 2-core machine shared with three other jobs (BENCHMARKS.md, "L4Q against QLoRA +
PTQ after deployment", which has the results): the base 25 minutes, the six 200-step
fine-tunes with --jobs 3 about 7 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from loss_study_report import verdict  # noqa: E402
from machine import cpu_model  # noqa: E402

BASE_RECIPE = "recipes/pretrain/tiny-fp32.yaml"
# The model of the larger loss study (STUDY8 in lptrain/testing/study.py, issue 27 part 2):
# the tiny preset (dim 128) with 4 layers instead of 2, ~10x the nano model's parameters.
MODEL = ("model.preset=tiny", "model.n_layers=4")
L4Q, QLORA = "l4q-4bit", "qlora-int4"
SEEDS = (0, 1, 2)
FINETUNE_DATA = "embedded:pydoc-topics"
# The validation split of pydoc-topics has 72 blocks of 128 tokens: 8 x 16 reads all of them
# once (the trainer warns), so the logged val_loss is `lptrain eval RUN` on the same weights.
WHOLE_SPLIT = "run.eval_batches=8"


@dataclass(frozen=True)
class Run:
    """One training run and the `lptrain` commands that make and measure it."""

    name: str
    train: tuple[str, ...]  # the `lptrain train` arguments
    measure: tuple[tuple[str, ...], ...]  # `lptrain` commands run after training, in order
    after: str = ""  # the key of the run it starts from (the base): a new base redoes it
    recipe: str = ""  # a fine-tune's recipe and seed (the report's rows)
    seed: int = 0

    @property
    def key(self) -> str:
        text = json.dumps([self.train, self.measure, self.after])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sets(*overrides: str) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def base_run(work: Path, steps: int, cache: str) -> Run:
    """The fp32 base: the README's pretraining recipe at the study's model size."""
    run_dir = work / "runs" / "base"
    common = (f"data.cache_dir={cache}", "logging.progress=lines", "checkpoint.interval=0")
    steps_ = (f"run.max_steps={steps}", f"run.eval_interval={steps}")
    train = ("train", BASE_RECIPE, "--run-dir", str(run_dir), *sets(*MODEL, *steps_, *common))
    # Its loss on the fine-tuning data before any fine-tuning (the whole split).
    measure = (("eval", str(run_dir), "--json", "--data", FINETUNE_DATA),)
    return Run("base", train, measure)


def finetune_run(
    base: Run, work: Path, recipe: str, seed: int, steps: int, cache: str, extra: tuple = ()
) -> Run:
    """One fine-tune of the base, its export and the export's evaluation; `extra`: `--set`
    overrides for both methods, applied last. The name holds the setting, so that results of
    several --steps and --set share one WORK (and its base)."""
    name = "-".join((recipe, f"{steps}steps", *(kv.replace("/", "_") for kv in extra), f"s{seed}"))
    run_dir = work / "runs" / name
    overrides = (
        f"init.from={work / 'runs' / 'base'}",
        *MODEL,
        f"run.seed={seed}",
        f"run.max_steps={steps}",
        f"run.eval_interval={steps}",  # one evaluation, at the end: the trained loss
        WHOLE_SPLIT,
        f"data.cache_dir={cache}",
        "checkpoint.interval=0",  # the final checkpoint only: what export reads
        "logging.progress=lines",
        *extra,
    )
    train = (
        "train",
        f"recipes/finetune/{recipe}.yaml",
        "--run-dir",
        str(run_dir),
        *sets(*overrides),
    )
    export = run_dir / "export"
    measure = (("export", str(run_dir)), ("eval", str(export), "--json"))
    return Run(name, train, measure, after=base.key, recipe=recipe, seed=seed)


def lptrain(args: tuple[str, ...], threads: int) -> str:
    """stdout of one `python -m lptrain` command; a failure stops the study with its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "lptrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(
            f"lptrain {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def json_line(stdout: str) -> dict:
    """The JSON line `lptrain eval --json` prints last."""
    return json.loads(stdout.strip().splitlines()[-1])


def cached(run: Run, work: Path) -> dict | None:
    """The saved result of exactly this run (same commands, same base), if there is one."""
    saved = work / "results" / f"{run.name}.json"
    if saved.exists() and (res := json.loads(saved.read_text()))["key"] == run.key:
        return res
    return None


def execute(run: Run, work: Path, threads: int) -> dict:
    """Train and measure one run, or return its cached result."""
    if (res := cached(run, work)) is not None:
        return res
    shutil.rmtree(work / "runs" / run.name, ignore_errors=True)  # an interrupted run: start over
    t0 = time.monotonic()
    lptrain(run.train, threads)
    train_s = time.monotonic() - t0
    outs = [lptrain(cmd, threads) for cmd in run.measure]
    res = {
        "key": run.key,
        "name": run.name,
        "train_s": train_s,
        "loss": json_line(outs[-1])["loss"],
    }
    run_dir = work / "runs" / run.name
    if run.name != "base":  # the export's record: the loss before folding, on the same split
        meta = json.loads((run_dir / "export" / "lptrain_export.json").read_text())
        res["trained"] = meta["val_loss"]["trained"]
        res["fold"] = sorted(set(meta["fold"].values()))
        res["bytes_per_weight"] = statistics.fmean(
            lay["bytes_per_param"] for lay in meta["layers"].values()
        )
    saved = work / "results" / f"{run.name}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(res, indent=1) + "\n")
    return res


def paired(l4q: dict[int, dict], qlora: dict[int, dict], field: str) -> list[float]:
    """L4Q minus QLoRA at each seed both have (same batches, same A draw)."""
    return [l4q[s][field] - qlora[s][field] for s in sorted(l4q) if s in qlora]


def outcome(diffs: list[float]) -> str:
    """The claim (L4Q lower after deployment) per loss_study_report.verdict's rule: every
    seed's difference of one sign and |mean| > 2 standard errors (sd / sqrt(n))."""
    v = verdict(diffs)
    return {"lower": "reproduced", "higher": "contradicted"}.get(v, f"unresolved ({v})")


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def report(base: dict | None, results: dict[str, dict[int, dict]]) -> str:
    l4q, qlora = results.get(L4Q, {}), results.get(QLORA, {})
    lines = []
    if base:
        lines.append(f"base before fine-tuning: {base['loss']:.4f} on {FINETUNE_DATA} "
                     f"(pretraining {base['train_s']:.0f} s)\n")  # fmt: skip
    lines += [
        f"| seed | {L4Q} trained | {L4Q} deployed | {QLORA} trained | {QLORA} deployed "
        "(W + B·A -> int4) | deployed L4Q - QLoRA+PTQ | trained L4Q - QLoRA |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in sorted(set(l4q) & set(qlora)):
        a, b = l4q[s], qlora[s]
        lines.append(f"| {s} | {a['trained']:.4f} | {a['loss']:.4f} | {b['trained']:.4f} | "
                     f"{b['loss']:.4f} | {a['loss'] - b['loss']:+.4f} | "
                     f"{a['trained'] - b['trained']:+.4f} |")  # fmt: skip
    dep, tr = paired(l4q, qlora, "loss"), paired(l4q, qlora, "trained")
    if dep:
        n = len(dep)
        for label, d in (("deployed", dep), ("trained (before export)", tr)):
            mean, sd = statistics.fmean(d), _sd(d)
            lines.append(f"\n{label}, L4Q - QLoRA over {n} seed(s): mean {mean:+.4f}, "
                         f"sd {sd:.4f}, standard error {sd / math.sqrt(n):.4f}")  # fmt: skip
        lines.append(f"\nverdict (L4Q lower after deployment): {outcome(dep)}")
    for name, runs in ((L4Q, l4q), (QLORA, qlora)):
        gaps = [r["loss"] - r["trained"] for r in runs.values()]
        if gaps:
            secs = statistics.fmean(r["train_s"] for r in runs.values())
            lines.append(f"- {name}: deployment gap (deployed - trained) "
                         f"{', '.join(f'{g:+.4f}' for g in gaps)}; {runs[min(runs)]['fold'][0]}; "
                         f"{runs[min(runs)]['bytes_per_weight']:.4f} bytes/weight; "
                         f"train {secs:.0f} s per run")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / "runs" / "finetune-study"))
    ap.add_argument("--base-steps", type=int, default=400)
    ap.add_argument(
        "--steps", type=int, default=200, help="fine-tuning steps per run (the recipes' own: 200)"
    )
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated")
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunes at a time (one thread each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of every fine-tune, both methods: optim.lr=1e-3")  # fmt: skip
    ap.add_argument("--report", action="store_true", help="tables from cached results only")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    cache = str(work / "cache")
    base = base_run(work, args.base_steps, cache)
    # QLoRA first: its step costs ~2x L4Q's (the int4 base is dequantized in every pass), and
    # the longest runs first keep every job busy until the end.
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        ap.error(f"--set: KEY=VALUE, got {bad[0]!r}")
    extra = tuple(args.set)
    runs = [finetune_run(base, work, r, s, args.steps, cache, extra)
            for r in (QLORA, L4Q) for s in seeds]  # fmt: skip
    t0 = time.monotonic()
    if args.report:
        done = {r.name: res for r in [base, *runs] if (res := cached(r, work)) is not None}
    else:
        done = {"base": execute(base, work, threads=2)}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for r, res in zip(runs, pool.map(lambda r: execute(r, work, 1), runs), strict=True):
                done[r.name] = res
                print(f"{r.name}: trained {res['trained']:.4f} deployed {res['loss']:.4f} "
                      f"{res['train_s']:.0f} s", file=sys.stderr)  # fmt: skip
    results: dict[str, dict[int, dict]] = {}
    for r in runs:
        if r.name in done:
            results.setdefault(r.recipe, {})[r.seed] = done[r.name]
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores; {datetime.date.today().isoformat()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end; this invocation "
          f"{time.monotonic() - t0:.0f} s")  # fmt: skip
    print(f"base: {BASE_RECIPE} with {' '.join(MODEL)}, {args.base_steps} steps on the "
          "embedded stdlib corpus; "
          f"fine-tune {args.steps} steps x 16 x 128 tokens on {FINETUNE_DATA}, ZeRO-2, 1 process, "
          f"{args.jobs} at a time with one thread each; --set {list(extra)}\n")  # fmt: skip
    print(report(done.get("base"), results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
