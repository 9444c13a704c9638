"""Monitoring overhead on the tiny recipes: the default set at intervals 1, 10 and 100, and
everything (fidelity probe, guard checks every 10 steps) at 100, each as a ratio to monitoring
off, measured in one process; prints a markdown table for BENCHMARKS.md.

usage: .venv/bin/python benchmarks/bench_monitoring.py [--recipes fp8,nvfp4] [--block 100]
                                                       [--rounds 3] [--intervals 1,10,100]
                                                       [--no-everything]
       .venv/bin/python benchmarks/bench_monitoring.py --stats-call

`--stats-call` times one quantize call's statistics instead (a 2048x128 operand of
fp8-current and of NVFP4's 16-point Hadamard GEMM): none, the default `monitor.stats`, every
statistic, in CPU time, median of 7 interleaved rounds.

One trainer session per recipe (`lptrain train`'s own setup: DeepSpeed ZeRO-0, the embedded
corpus); the variants then take turns on the same model, `--block` optimizer steps each, for
`--rounds` rounds, so a burst of load from other processes hits every variant alike. A block of
100 steps holds exactly 1, 10 or 100 monitored steps. Time is the process's CPU time (user +
system, one thread: what the work costs, not what the neighbours do) and wall-clock as a
check; each ratio is the median over rounds of block time / the same round's "off" block.
Rows are built and serialized as the trainer does (json.dumps), not written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from machine import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _session(recipe: str, workdir: Path):
    from lptrain.config import schema
    from lptrain.data import dataset
    from lptrain.distributed import engine as eng
    from lptrain.models import converters
    from lptrain.trainer import loop

    overrides = ["run.max_steps=100000", "run.eval_interval=0", "checkpoint.interval=0",
                 "logging.wandb.mode=disabled", "monitor.interval=0"]  # fmt: skip
    cfg = schema.load(REPO / f"recipes/pretrain/tiny-{recipe}.yaml", overrides)
    info = eng.dist_env()
    if not torch.distributed.is_initialized():
        eng.init_distributed(info)
    tok = dataset.load_tokenizer(cfg.data.tokenizer)
    ds = eng.deepspeed_config(cfg, info.world)
    s = loop.setup(cfg, ds, converters.build(cfg), tok, info, workdir, lambda m: None)
    return cfg, s, tok.vocab_size


def variants(intervals: list[int], everything: bool) -> dict:
    """off, the default set at each interval, and everything (fidelity, guard) at 100."""
    out = {"off": None}
    out.update({f"default, interval {i}": {"interval": i} for i in sorted(intervals, reverse=True)})
    if everything:
        out["everything, interval 100"] = {"interval": 100, "fidelity": True, "guard": True}
    return out


def _monitoring(cfg, s, vocab: int, spec):
    from lptrain.trainer import loop

    if spec is None:
        return None, loop.train_step
    monitor = dataclasses.replace(cfg.monitor, interval=spec["interval"],
                                  fidelity=spec.get("fidelity", False))  # fmt: skip
    guard = dataclasses.replace(cfg.precision.guard, enabled=spec.get("guard", False))
    precision = dataclasses.replace(cfg.precision, guard=guard)
    vcfg = dataclasses.replace(cfg, monitor=monitor, precision=precision)
    from lptrain.trainer.loop import make_monitoring as build

    m = build(vcfg, s.model, s.train_src.blocks, _split(s), s.layout, s.engine.device, vocab)
    return m, m.wrap(loop.train_step)


def _split(s):
    from lptrain.data import dataset

    return dataset.split(len(s.train_src.blocks), s.cfg.data.val_fraction)


def _block(s, monitoring, step_fn, p, steps: int, per_step: list | None = None):
    """`steps` optimizer steps; returns (cpu seconds, wall seconds, progress). `per_step`
    collects (step, cpu seconds) of every step, monitoring included (the per-step timers)."""
    from dataclasses import replace

    s.monitoring, s.step_fn = monitoring, step_fn
    g = s.layout.global_batch
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        t0 = time.process_time()
        r = s.step_fn(s, p)
        p = replace(p, step=p.step + 1, sample_index=p.sample_index + g)
        if monitoring is not None:
            row, events = monitoring.after_step(p.step, r)
            json.dumps(monitoring.step_metrics(1000.0, g * s.cfg.data.block_size))
            if row is not None:
                json.dumps(row)
        if per_step is not None:
            per_step.append((p.step, time.process_time() - t0))
    return time.process_time() - c0, time.perf_counter() - w0, p


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) / len(xs) ** 0.5


def timer_overhead(steps: dict[str, list], interval: int, name: str) -> tuple[float, float]:
    """The overhead of monitoring at `interval` from the per-step timers of one process: the
    extra CPU time of the steps it monitors (against the same variant's other steps), spread
    over `interval` steps, plus what it adds to every step (its other steps against "off"
    steps), as a fraction of an "off" step; and the standard error of that estimate. Whole-
    block ratios cannot resolve 1% here (their round-to-round noise is about 10%); the mean of
    hundreds of single-step timings can."""
    off, off_se = _mean_se([t for _, t in steps["off"]])
    mon = [t for k, t in steps[name] if k % interval == 0]
    other = [t for k, t in steps[name] if k % interval != 0]
    m, m_se = _mean_se(mon)
    o, o_se = _mean_se(other) if other else (m, 0.0)
    extra = (m - o) / interval + (o - off)
    se = ((m_se**2 + o_se**2) / interval**2 + o_se**2 + off_se**2) ** 0.5
    return extra / off, se / off


def measure(recipe: str, block: int, rounds: int, specs: dict) -> dict:
    from lptrain.checkpoint.store import Progress

    with tempfile.TemporaryDirectory() as tmp:
        cfg, s, vocab = _session(recipe, Path(tmp))
        variants = {name: _monitoring(cfg, s, vocab, spec) for name, spec in specs.items()}
        p = Progress()
        _, _, p = _block(s, *variants["off"], p, 10)  # warm-up: allocations, first steps
        times = {name: [] for name in variants}
        steps = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (m, fn) in variants.items():
                cpu, wall, p = _block(s, m, fn, p, block, steps[name])
                times[name].append((cpu, wall))
    timers = {name: timer_overhead(steps, spec["interval"], name)
              for name, spec in specs.items() if spec is not None}  # fmt: skip
    out = {}
    for name, ts in times.items():
        cpu = [t[0] / off[0] for t, off in zip(ts, times["off"], strict=True)]
        wall = [t[1] / off[1] for t, off in zip(ts, times["off"], strict=True)]
        ms = statistics.median(t[0] for t in ts) / block * 1e3
        out[name] = (ms, statistics.median(cpu), statistics.median(wall), timers.get(name))
    return out


def stats_call(rounds: int = 7, repeats: int = 10) -> None:
    """The statistics part of one quantize call with the default set and with everything."""
    from lptrain.config.schema import STATS
    from lptrain.numerics import fake_quantize
    from lptrain.numerics.stats import OPTIONAL
    from lptrain.recipes import get

    x = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0))
    specs = {"fp8-current": get("fp8-current").spec("output", "input"),
             "nvfp4 (16-point Hadamard)": get("nvfp4").spec("grad_weight", "input")}  # fmt: skip
    print("| operand (2048x128) | no statistics, ms | default set, ms | everything, ms |")
    print("|---|---:|---:|---:|")
    calls = [{}, {"with_stats": True, "wanted": STATS}, {"with_stats": True, "wanted": OPTIONAL}]
    for name, spec in specs.items():
        times = [[] for _ in calls]
        for _ in range(rounds):
            for kw, out in zip(calls, times, strict=True):
                t = time.process_time()
                for _ in range(repeats):
                    fake_quantize(x, spec, generator=torch.Generator().manual_seed(1), **kw)
                out.append((time.process_time() - t) / repeats * 1e3)
        ms = [statistics.median(t) for t in times]
        print(f"| {name} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="fp8,nvfp4")
    ap.add_argument("--block", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--intervals", default="1,10,100", help="the default set at these")
    ap.add_argument("--everything", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--stats-call", action="store_true", help="time one quantize call's stats")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.stats_call:
        return stats_call()
    specs = variants([int(i) for i in args.intervals.split(",")], args.everything)
    results = {r: measure(r, args.block, args.rounds, specs) for r in args.recipes.split(",")}
    load = os.getloadavg()[0]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores (1 torch thread); torch "
          f"{torch.__version__}; {datetime.date.today()}; blocks of {args.block} steps, "
          f"median of {args.rounds} interleaved rounds; load average {load:.1f}\n")  # fmt: skip
    print("| recipe | monitoring | CPU ms/step | CPU time vs off | wall time vs off | "
          "overhead from per-step timers (± 1 s.e.) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for recipe, rows in results.items():
        for name, (ms, cpu, wall, timer) in rows.items():
            t = f"{100 * timer[0]:+.2f}% ± {100 * timer[1]:.2f}%" if timer else "-"
            print(f"| tiny-{recipe} | {name} | {ms:.0f} | {cpu:.3f}x | {wall:.3f}x | {t} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
