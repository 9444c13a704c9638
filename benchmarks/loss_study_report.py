"""Tables and the plot of the loss study (benchmarks/loss_study.py) from its per-run results.

Two ways to compare a recipe R with fp32, both over the same seeds:
* unpaired: mean(R) - mean(fp32), also in units of fp32's seed standard deviation (sd, n-1);
* paired: the mean and sd over seeds s of R_s - fp32_s. A seed fixes the initial weights and
  the data order, so where training does not amplify small numerical differences (the study's
  setup, see lptrain/testing/study.py) the paired gap measures the numerics alone.
A difference counts as resolved when every seed's paired gap has the same sign and the mean is
more than twice its standard error (sd / sqrt(n)); otherwise the table says "not resolved".
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lptrain import recipes

FP32 = "fp32"

# (claim, who says it, what they report, A, B): the comparison is B against A, same seeds.
CLAIMS = [
    ("Hadamard on every GEMM (SR gradients)", "Elucidating FP4; Quartet",
     "lower loss with", "fp4-ue5m3-no-hadamard", "fp4-ue5m3"),
    ("Hadamard on every GEMM (nearest gradients)", "Elucidating FP4",
     "lower loss with", "fp4-ue5m3-no-hadamard-nearest-grads", "fp4-ue5m3-nearest-grads"),
    ("SR on gradients (with Hadamard)", "Elucidating FP4; Quartet",
     "lower loss with (unbiased)", "fp4-ue5m3-nearest-grads", "fp4-ue5m3"),
    ("SR on gradients (no Hadamard)", "Elucidating FP4; Quartet",
     "lower loss with (unbiased)", "fp4-ue5m3-no-hadamard-nearest-grads", "fp4-ue5m3-no-hadamard"),
    ("UE5M3 instead of E4M3 block scales", "Elucidating FP4",
     "lower or equal loss (more range)", "fp4-ue5m3-e4m3-scales", "fp4-ue5m3"),
    ("delayed instead of current FP8 scaling", "TE docs; To FP8 and Back Again",
     "equal or higher loss (stale scales)", "fp8-current", "fp8-delayed"),
    ("INT16 DFP instead of fp32", "Das et al. 2018",
     "no loss of accuracy", FP32, "int16-dfp"),
    ("INT32 wrap-around instead of overflow handling", "Das et al. 2018",
     "overflow must be handled", "int16-dfp", "int16-dfp-wrap"),
    ("delayed scaling starting at scale 1 (TE) instead of current", "TE DelayedScaling",
     "(TE's default start)", "fp8-delayed", "fp8-delayed-init-one"),
]  # fmt: skip


def _by_label(results: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in results:
        out.setdefault(r["label"], {})[r["seed"]] = r
    return out


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def _finals(runs: dict[int, dict]) -> list[float]:
    return [runs[s]["final"] for s in sorted(runs)]


def _paired(runs: dict[int, dict], ref: dict[int, dict]) -> list[float]:
    return [runs[s]["final"] - ref[s]["final"] for s in sorted(runs) if s in ref]


def verdict(diffs: list[float]) -> str:
    """'B lower' / 'B higher' when resolved (see the module docstring), else 'not resolved'."""
    finite = [d for d in diffs if math.isfinite(d)]
    if len(finite) < 2 or len(finite) < len(diffs):
        return "diverged" if len(finite) < len(diffs) else "one seed"
    mean, se = statistics.fmean(finite), _sd(finite) / math.sqrt(len(finite))
    same_sign = all(d < 0 for d in finite) or all(d > 0 for d in finite)
    if same_sign and abs(mean) > 2 * se:
        return "lower" if mean < 0 else "higher"
    return "not resolved"


def _pm(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):+.{digits}f} ± {_sd(xs):.{digits}f}".lstrip("+")


def main_table(g: dict[str, dict[int, dict]]) -> str:
    ref = g[FP32]
    ref_f = _finals(ref)
    sd0 = _sd(ref_f)
    lines = [
        "| recipe (seeds) | final val loss (mean ± sd) | min - max | gap to fp32 (same seeds) "
        "| gap / fp32 sd "
        "| paired gap (mean ± sd) | tokens/s |",
        "| --- | --- | --- | ---: | ---: | --- | ---: |",
    ]
    for name in _order(g):
        f = _finals(g[name])
        m0 = statistics.fmean(ref[s]["final"] for s in g[name] if s in ref)  # the same seeds
        gap = statistics.fmean(f) - m0
        tps = statistics.median(r["tokens_per_s"] for r in g[name].values())
        pair = _paired(g[name], ref) if name != FP32 else []
        lines.append(
            f"| {name} ({len(f)}) | {_pm(f)} | {min(f):.4f} - {max(f):.4f} "
            f"| {gap:+.4f} ({gap / m0:+.2%}) | {gap / sd0:+.1f} | "
            f"{_pm(pair) if pair else '-'} | {tps:.0f} |"
        )
    return "\n".join(lines)


def _order(g: dict[str, dict[int, dict]]) -> list[str]:
    """Named recipes in catalog order, then variants (claims' recipes) by name."""
    names = recipes.names()
    other = (n for n in g if n not in names and ":" not in n and "@" not in n)  # no other suite
    return [n for n in names if n in g] + sorted(other)


def claims_table(g: dict[str, dict[int, dict]]) -> str:
    sd0 = _sd(_finals(g[FP32]))
    lines = [
        "| claim | source | reported | A -> B | A | B | B - A paired (mean ± sd) "
        "| in fp32 sds | this setup: B is |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: | --- |",
    ]
    for claim, who, says, a, b in CLAIMS:
        if a not in g or b not in g:
            continue
        d = _paired(g[b], g[a])
        lines.append(
            f"| {claim} | {who} | {says} | {a} -> {b} | {_pm(_finals(g[a]))} "
            f"| {_pm(_finals(g[b]))} | {_pm(d)} | {statistics.fmean(d) / sd0:+.1f} "
            f"| {verdict(d)} |"
        )
    return "\n".join(lines)


def lr_table(g: dict[str, dict[int, dict]], lrs, names, base_lr: float) -> str:
    def label(name: str, lr: float) -> str:
        return name if lr == base_lr else f"{name}@lr{lr:g}"

    head = " | ".join(f"lr {lr:g}" for lr in lrs)
    lines = [f"| recipe | {head} |", "| --- |" + " --- |" * len(lrs)]
    for name in names:
        cells = []
        for lr in lrs:
            runs, ref = g.get(label(name, lr)), g.get(label(FP32, lr))
            if not runs:
                cells.append("-")
                continue
            f = _finals(runs)
            div = sum(
                not math.isfinite(r["final"]) or r["skipped_steps"] > 0 for r in runs.values()
            )
            cell = _pm([x for x in f if math.isfinite(x)]) + (f" ({div} diverged)" if div else "")
            if name != FP32 and ref:
                cell += f"; paired {_pm(_paired(runs, ref))}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ci_table(g: dict[str, dict[int, dict]], test_seed: int = 0) -> str:
    """Paired gaps at each CI seed in units of fp32's seed sd: the test's bounds come from here."""
    ref = g[FP32]
    f_all = _finals(ref)
    sd = _sd(f_all)
    lines = [
        f"fp32 at the CI setup: {_pm(f_all)} over seeds {sorted(ref)} (seed {test_seed}: "
        f"{ref[test_seed]['final']:.4f}); gaps below are recipe - fp32 at the same seed, "
        f"in nats and in units of that sd ({sd:.4f}).",
        "",
        f"| recipe | paired gap per seed | mean ± sd | seed {test_seed} / fp32 sd "
        "| max abs gap / fp32 sd | vs fp32 |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for label, runs in g.items():
        if label == FP32:
            continue
        d = _paired(runs, ref)
        seed0 = (
            runs[test_seed]["final"] - ref[test_seed]["final"] if test_seed in runs else math.nan
        )
        lines.append(
            f"| {label} | {', '.join(f'{x:+.4f}' for x in d)} | {_pm(d)} | {seed0 / sd:+.2f} "
            f"| {max(abs(x) for x in d) / sd:.2f} | {verdict(d)} |"
        )
    return "\n".join(lines)


def plot(g: dict[str, dict[int, dict]], path: Path) -> None:
    """Validation loss against tokens per recipe: the mean over seeds and the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in recipes.names() if n in g]  # the named recipes only
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.get_cmap("tab20")(range(len(names)))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for name, color in zip(names, colors, strict=True):
            curves = [r["curve"] for r in g[name].values() if r["curve"]]
            n = min(len(c) for c in curves)
            tokens = [curves[0][i][1] / 1e6 for i in range(n)]
            vals = [[c[i][2] for c in curves] for i in range(n)]
            style = "-" if name in (FP32, "bf16", "int16-dfp") else "--" if "8" in name else ":"
            n_seeds = len(curves)  # a recipe short of fp32's seeds says so: its mean differs
            label = name if n_seeds == len(g[FP32]) else f"{name} ({n_seeds} seeds)"
            ax.plot(tokens, [statistics.fmean(v) for v in vals], style, color=color, label=label,
                    lw=2.2 if name == FP32 else 1.3)  # fmt: skip
            ax.fill_between(tokens, [min(v) for v in vals], [max(v) for v in vals],
                            color=color, alpha=0.15, lw=0)  # fmt: skip
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        if zoom:
            last = max(c[-1][1] for r in g[FP32].values() for c in [r["curve"]]) / 1e6
            ax.set_xlim(0.5 * last, last * 1.01)
            lo = min(min(r["final"] for r in g[n].values()) for n in names)
            ax.set_ylim(lo - 0.01, lo + 0.25)
            ax.set_title("last half (zoom)")
        else:
            ax.set_title(f"every recipe, mean of {len(g[FP32])} seeds, band = min-max")
    axes[1].legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[dict], suites: list[str], plot_path: Path | None, lr_grid) -> str:
    """The markdown for `suites`; lr_grid = (learning rates, recipes, the study's own rate)."""
    g = _by_label(results)
    out = []
    if "main" in suites and FP32 in g:
        out += ["### Every recipe", "", main_table(g), ""]
        if plot_path is not None:
            plot(g, plot_path)
            out += [f"(plot: {plot_path})", ""]
    if "claims" in suites and FP32 in g:
        out += ["### The seed papers' claims", "", claims_table(g), ""]
    if "lr" in suites:
        out += ["### Learning-rate sweep (final val loss)", "", lr_table(g, *lr_grid), ""]
    if "ci" in suites and "ci:fp32" in g:
        out += ["### The CI test's setup", "", ci_table(_strip(g, "ci:")), ""]
    if "mainjob" in suites:
        for prefix, title in (("job:", "warmup 20"), ("job-w100:", "warmup 100")):
            if f"{prefix}{FP32}" in g:
                out += [f"### The main job (tiny, {title})", "", main_table(_strip(g, prefix)), ""]
    return "\n".join(out)


def _strip(g: dict[str, dict[int, dict]], prefix: str) -> dict[str, dict[int, dict]]:
    return {k[len(prefix) :]: v for k, v in g.items() if k.startswith(prefix)}
