"""Tables and the plot of the loss study (benchmarks/loss_study.py) from its per-run results.

Two ways to compare a recipe R with fp32, both over the same seeds:
* unpaired: mean(R) - mean(fp32), also in units of fp32's seed standard deviation (sd, n-1);
* paired: the mean and sd over seeds s of R_s - fp32_s. A seed fixes the initial weights and
  the data order, so where training does not amplify small numerical differences (the study's
  setup, see lptrain/testing/study.py) the paired gap measures the numerics alone.
A difference counts as resolved when every seed's paired gap has the same sign and the mean is
more than twice its standard error (sd / sqrt(n)); otherwise the table says "not resolved".
A claim (the claims8 suite) is then "reproduced" when resolved in the direction its source
reports, "contradicted" when resolved the other way, and "unresolved" otherwise.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lptrain import recipes

FP32 = "fp32"

# (claim, who says it, what they report, A, B, the sign of B - A reported): the comparison is
# B against A, same seeds; sign 0 where the source reports no difference (only a difference can
# be resolved, so such a claim is never "reproduced").
CLAIMS = [
    ("Hadamard on every GEMM (SR gradients)", "Elucidating FP4; Quartet",
     "lower loss with", "fp4-ue5m3-no-hadamard", "fp4-ue5m3", -1),
    ("Hadamard on every GEMM (nearest gradients)", "Elucidating FP4",
     "lower loss with", "fp4-ue5m3-no-hadamard-nearest-grads", "fp4-ue5m3-nearest-grads", -1),
    ("SR on gradients (with Hadamard)", "Elucidating FP4; Quartet",
     "lower loss with (unbiased)", "fp4-ue5m3-nearest-grads", "fp4-ue5m3", -1),
    ("SR on gradients (no Hadamard)", "Elucidating FP4; Quartet",
     "lower loss with (unbiased)", "fp4-ue5m3-no-hadamard-nearest-grads", "fp4-ue5m3-no-hadamard",
     -1),
    ("UE5M3 instead of E4M3 block scales", "Elucidating FP4",
     "lower or equal loss (more range)", "fp4-ue5m3-e4m3-scales", "fp4-ue5m3", -1),
    ("delayed instead of current FP8 scaling", "TE docs; To FP8 and Back Again",
     "equal or higher loss (stale scales)", "fp8-current", "fp8-delayed", 1),
    ("INT16 DFP instead of fp32", "Das et al. 2018",
     "no loss of accuracy", FP32, "int16-dfp", 0),
    ("INT32 wrap-around instead of overflow handling", "Das et al. 2018",
     "overflow must be handled", "int16-dfp", "int16-dfp-wrap", 1),
    ("delayed scaling starting at scale 1 (TE) instead of current", "TE DelayedScaling",
     "(TE's default start)", "fp8-delayed", "fp8-delayed-init-one", 0),
]  # fmt: skip
# The nano study's paired B - A for the claims the 8x study re-runs (BENCHMARKS.md, "The seed
# papers' claims", 2026-12-02): mean ± sd over seeds 0-2, none resolved.
NANO_CLAIMS = {
    "Hadamard on every GEMM (SR gradients)": "-0.0045 ± 0.0187",
    "SR on gradients (with Hadamard)": "-0.0056 ± 0.0095",
    "UE5M3 instead of E4M3 block scales": "-0.0015 ± 0.0163",
    "delayed instead of current FP8 scaling": "0.0049 ± 0.0113",
}


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


def main_table(g: dict[str, dict[int, dict]], ref_label: str = FP32) -> str:
    ref = g[ref_label]
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
        pair = _paired(g[name], ref) if name != ref_label else []
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


def _ran_claims(g: dict[str, dict[int, dict]]):
    """(claim row, paired B - A per common seed) for each claim whose two recipes both ran."""
    for row in CLAIMS:
        a, b = row[3], row[4]
        if a in g and b in g:
            yield row, _paired(g[b], g[a])


def claims_table(g: dict[str, dict[int, dict]]) -> str:
    sd0 = _sd(_finals(g[FP32]))
    lines = [
        "| claim | source | reported | A -> B | A | B | B - A paired (mean ± sd) "
        "| in fp32 sds | this setup: B is |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: | --- |",
    ]
    for (claim, who, says, a, b, _), d in _ran_claims(g):
        lines.append(
            f"| {claim} | {who} | {says} | {a} -> {b} | {_pm(_finals(g[a]))} "
            f"| {_pm(_finals(g[b]))} | {_pm(d)} | {statistics.fmean(d) / sd0:+.1f} "
            f"| {verdict(d)} |"
        )
    return "\n".join(lines)


def claim_verdict(diffs: list[float], sign: int) -> str:
    """reproduced / contradicted / unresolved (module docstring); 'diverged' when a run did."""
    v = verdict(diffs)
    if v in ("lower", "higher"):
        return "reproduced" if (v == "higher") == (sign > 0) and sign else "contradicted"
    return "diverged" if v == "diverged" else "unresolved"


def claims8_table(g: dict[str, dict[int, dict]]) -> str:
    """The claims whose two recipes both ran: per-seed paired B - A, mean ± sd, verdict."""
    lines = [
        "| claim | source: B has | A -> B | B - A per seed | mean ± sd | mean / se "
        "| verdict | nano study |",
        "| --- | --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for (claim, who, says, a, b, sign), d in _ran_claims(g):
        lines.append(
            f"| {claim} | {who}: {says} | {a} -> {b} | {', '.join(f'{x:+.4f}' for x in d)} "
            f"| {_pm(d)} | {_in_se(d)} | {claim_verdict(d, sign)} "
            f"| {NANO_CLAIMS.get(claim, '-')} |"
        )
    return "\n".join(lines)


def _in_se(d: list[float]) -> str:
    """The mean in units of its standard error; '-' from one seed (no spread to measure)."""
    if len(d) < 2:
        return "-"
    mean, se = statistics.fmean(d), _sd(d) / math.sqrt(len(d))
    return f"{mean / se:+.1f}" if se > 0 else "inf"


def lr_table(g: dict[str, dict[int, dict]], lrs, names, base_lr: float, ref_label=FP32) -> str:
    head = " | ".join(f"lr {lr:g}" for lr in lrs)
    lines = [f"| recipe | {head} |", "| --- |" + " --- |" * len(lrs)]
    for name in names:
        cells = []
        for lr in lrs:
            runs = g.get(_lr_label(name, lr, base_lr))
            ref = g.get(_lr_label(ref_label, lr, base_lr))
            if not runs:
                cells.append("-")
                continue
            f = _finals(runs)
            div = sum(
                not math.isfinite(r["final"]) or r["skipped_steps"] > 0 for r in runs.values()
            )
            cell = _pm([x for x in f if math.isfinite(x)]) + (f" ({div} diverged)" if div else "")
            if name != ref_label and ref:
                pair = _paired(runs, ref)
                cell += f"; paired {_pm(pair)}" + (f" ({verdict(pair)})" if len(pair) > 1 else "")
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ci_table(g: dict[str, dict[int, dict]], test_seed: int = 0) -> str:
    """Paired gaps at each CI seed in units of fp32's seed sd: the test's bounds come from here
    (an upper bound from the largest abs gap, an FP4 recipe's floor from the smallest gap)."""
    ref = g[FP32]
    f_all = _finals(ref)
    sd = _sd(f_all)
    lines = [
        f"fp32 at the CI setup: {_pm(f_all)} over seeds {sorted(ref)} (seed {test_seed}: "
        f"{ref[test_seed]['final']:.4f}); gaps below are recipe - fp32 at the same seed, "
        f"in nats and in units of that sd ({sd:.4f}).",
        "",
        f"| recipe | paired gap per seed | mean ± sd | seed {test_seed} / fp32 sd "
        "| min gap / fp32 sd | max abs gap / fp32 sd | vs fp32 |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
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
            f"| {min(d) / sd:+.2f} | {max(abs(x) for x in d) / sd:.2f} | {verdict(d)} |"
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


def plot8(g: dict[str, dict[int, dict]], ref: str, lr_grid, path: Path) -> None:
    """The claims8 suite: val loss curves, each claim's paired B - A along training, and the
    final loss against the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, names, base_lr = lr_grid
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    curve_names = [n for n in g if "@" not in n]
    colors = dict(zip(curve_names, plt.get_cmap("tab10")(range(len(curve_names))), strict=True))
    ax = axes[0]
    for name in curve_names:
        tokens, vals = _mean_curve(g[name])
        ax.plot(tokens, vals, color=colors[name], label=name, lw=2.2 if name == ref else 1.3)
    lo = min(_mean_curve(g[n])[1][-1] for n in curve_names)
    ax.set_ylim(lo - 0.05, lo + 0.6)  # the last two thirds: the start is ~3 nats higher
    ax.set(title=f"val loss, mean of {len(g[ref])} seeds", xlabel="training tokens (millions)",
           ylabel="validation loss (nats/byte)")  # fmt: skip
    ax.legend(fontsize=8)
    ax = axes[1]
    shown = [c for c in CLAIMS if set(g.get(c[3], ())) & set(g.get(c[4], ()))]  # a seed of both
    for (claim, _, _, a, b, _), color in zip(shown, plt.get_cmap("Dark2")(range(8)), strict=False):
        diffs = []
        for s in sorted(set(g[a]) & set(g[b])):
            ca, cb = g[a][s]["curve"], g[b][s]["curve"]
            diffs.append([y[2] - x[2] for x, y in zip(ca, cb, strict=False)])
            ax.plot([x[1] / 1e6 for x in ca[: len(diffs[-1])]], diffs[-1], color=color, lw=0.6,
                    alpha=0.5)  # fmt: skip
        n = min(map(len, diffs))
        ax.plot([x[1] / 1e6 for x in g[a][min(g[a])]["curve"][:n]],
                [statistics.fmean(d[i] for d in diffs) for i in range(n)], color=color, lw=2,
                label=f"{claim}: {b} - {a}")  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set(title="paired B - A (thin: per seed; thick: mean)", xlabel="training tokens (millions)",
           ylabel="val loss difference (nats/byte)")  # fmt: skip
    ax.legend(fontsize=6.5)
    ax = axes[2]
    for name in names:
        pts = [(lr, r["final"]) for lr in lrs
               for r in g.get(_lr_label(name, lr, base_lr), {}).values()]  # fmt: skip
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors.get(name), s=14)
        means = [(lr, statistics.fmean(v)) for lr in lrs
                 if (v := [p[1] for p in pts if p[0] == lr and math.isfinite(p[1])])]  # fmt: skip
        ax.plot([m[0] for m in means], [m[1] for m in means], color=colors.get(name), label=name)
    ax.set_xscale("log")
    ax.set(title="final val loss against the learning rate (dots: seeds)", xlabel="peak lr",
           ylabel="final validation loss (nats/byte)")  # fmt: skip
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(runs: dict[int, dict]) -> tuple[list[float], list[float]]:
    """(tokens in millions, mean val loss over seeds) at the evaluations every seed reached."""
    curves = [r["curve"] for r in runs.values() if r["curve"]]
    n = min(len(c) for c in curves)
    return [curves[0][i][1] / 1e6 for i in range(n)], [
        statistics.fmean(c[i][2] for c in curves) for i in range(n)
    ]


def _lr_label(name: str, lr: float, base_lr: float) -> str:
    return name if lr == base_lr else f"{name}@lr{lr:g}"


def report(
    results: list[dict], suites: list[str], plot_path: Path | None, lr_grid, claims8=None
) -> str:
    """The markdown for `suites`; lr_grid = (learning rates, recipes, the study's own rate);
    claims8 = (label prefix, reference recipe, lr_grid) of the claims8 suite."""
    g = _by_label(results)
    out = []
    if "main" in suites and FP32 in g:
        out += ["### Every recipe", "", main_table(g), ""]
        if plot_path is not None:
            plot(g, plot_path)
            out += [f"(plot: {plot_path})", ""]
    if "claims8" in suites and claims8 is not None:
        prefix, ref, grid8 = claims8
        g8 = _strip(g, prefix)
        if ref in g8:
            out += ["### Every recipe at 8x", "", main_table(g8, ref), "",
                    "### The seed papers' claims at 8x", "", claims8_table(g8), "",
                    "### Learning-rate sweep at 8x (final val loss)", "",
                    lr_table(g8, *grid8, ref), ""]  # fmt: skip
            if plot_path is not None:
                plot8(g8, ref, grid8, plot_path)
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
