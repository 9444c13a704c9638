"""The report's figures (matplotlib, Agg): each function returns a Figure or None (no data).

Every figure has labelled axes with units, a title that names what it shows, and a legend or a
colorbar. Runs keep one colour across figures (the order given on the command line).
"""

from __future__ import annotations

import math
import re

import matplotlib

matplotlib.use("Agg")  # headless: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from lptrain.report.runs import Run  # noqa: E402

# The six quantized operands in GEMM order (fprop, dgrad, wgrad), for stable subplot order.
OPERANDS = (
    "output.input",
    "output.weight",
    "grad_input.grad_output",
    "grad_input.weight",
    "grad_weight.grad_output",
    "grad_weight.input",
)
# `quant/<layer>/...` (the run's own recipe) or `shadow/<recipe>/<layer>/...` (monitor.shadow)
_QUANT = re.compile(
    r"^(?P<source>quant|shadow/[^/]+)/(?P<layer>.+)/(?P<op>[a-z_]+\.[a-z_]+)/(?P<stat>[a-z_]+)$"
)


def color(i: int) -> str:
    return plt.get_cmap("tab10")(i % 10)


def _tokens_axis(ax) -> None:
    ax.set_xlabel("tokens")
    ax.xaxis.set_major_formatter(EngFormatter(places=0, sep=""))
    ax.grid(alpha=0.3)


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points (the first points average what exists)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _window(n: int) -> int:
    return max(1, n // 20)  # 5% of the logged steps


def _mark_events(ax, run: Run, i: int, losses: dict[int, float]) -> None:
    spikes = [e for e in run.events if e["kind"] == "spike"]
    if spikes:
        xs = [run.tokens(e["step"]) for e in spikes]
        ys = [e.get("loss") or losses.get(e["step"], math.nan) for e in spikes]
        ax.scatter(xs, ys, marker="X", s=70, color=color(i), edgecolor="black", zorder=5,
                   label=f"{run.name}: loss spike")  # fmt: skip
    guards = [e for e in run.events if e["kind"] == "guard"]
    for j, e in enumerate(guards):
        ax.axvline(run.tokens(e["step"]), color=color(i), ls=":", lw=1.5,
                   label=f"{run.name}: guard fallback" if j == 0 else None)  # fmt: skip


def loss_figure(runs: list[Run]) -> Figure:
    """Training and validation loss against tokens, every run on one axis, events marked."""
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    all_y = []
    for i, run in enumerate(runs):
        x, y = run.series(run.train, "loss")
        ax.plot(x, y, color=color(i), lw=1.0, alpha=0.35)
        ax.plot(x, smooth(y, _window(len(y))), color=color(i), lw=2, label=f"{run.name}: train")
        vx, vy = run.series(run.evals, "val_loss")
        if vx:
            ax.plot(vx, vy, "o--", color=color(i), ms=5, label=f"{run.name}: validation")
        _mark_events(ax, run, i, {r["step"]: r["loss"] for r in run.train})
        all_y += [v for v in y + vy if v is not None]
    if all_y and max(all_y) > 3 * float(np.median(all_y)):
        ax.set_yscale("log")  # a diverged run would flatten everyone else's curve
    _tokens_axis(ax)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss against tokens (thin: every logged step; thick: trailing mean)")
    ax.legend(fontsize=8, ncol=2 if len(runs) > 2 else 1)
    return fig


def _curve(run: Run, validation: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss): validation, or the trailing mean of the training loss."""
    if validation:
        x, y = run.series(run.evals, "val_loss")
        return np.asarray(x), np.asarray(y)
    x, y = run.series(run.train, "loss")
    return np.asarray(x), smooth(y, _window(len(y)))


def gap_figure(runs: list[Run]) -> Figure | None:
    """Loss gap to the first run, in percent, at the same tokens, like with like: validation
    where both runs evaluated, else the training loss's trailing mean (never one against the
    other); only over the tokens both runs reached."""
    if len(runs) < 2:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.5), layout="constrained")
    ax.axhline(0, color=color(0), lw=1.5, label=f"{runs[0].name} (reference)")
    ref_has_val = bool(runs[0].series(runs[0].evals, "val_loss")[0])
    for i, run in enumerate(runs[1:], start=1):
        val = ref_has_val and bool(run.series(run.evals, "val_loss")[0])
        rx, ry = _curve(runs[0], val)
        x, y = _curve(run, val)
        inside = (x >= rx.min()) & (x <= rx.max()) if len(rx) else x < 0
        if not inside.any():
            continue
        ref = np.interp(x[inside], rx, ry)
        kind = "validation" if val else "train, trailing mean"
        ax.plot(x[inside], 100 * (y[inside] - ref) / ref, "o-" if val else "-",
                color=color(i), ms=4, label=f"{run.name} ({kind})")  # fmt: skip
    _tokens_axis(ax)
    ax.set_ylabel(f"loss gap to {runs[0].name} (%)")
    ax.set_title(f"Gap to the first run, {runs[0].name}: 100 (L - L_ref) / L_ref, "
                 "where both runs reached")  # fmt: skip
    ax.legend(fontsize=8)
    return fig


def shadow_sources(run: Run) -> list[str]:
    """`shadow/<recipe>` of every shadow recipe in the run's layer rows, in first-seen order."""
    found = (_QUANT.match(k) for row in run.layers for k in row)
    return list(dict.fromkeys(m["source"] for m in found if m and m["source"] != "quant"))


def quant_table(run: Run, stat: str, source: str = "quant") -> dict[str, dict[str, dict]]:
    """{operand: {layer: {step: value}}} of one statistic from the run's layer rows, of the
    run's own recipe (`quant`) or of a shadow recipe (`shadow/<recipe>`)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for row in run.layers:
        for key, value in row.items():
            m = _QUANT.match(key)
            if m and m["source"] == source and m["stat"] == stat and value is not None:
                out.setdefault(m["op"], {}).setdefault(m["layer"], {})[row["step"]] = value
    return {op: out[op] for op in OPERANDS if op in out}


def _layer_ticks(ax, layers: list[str]) -> None:
    every = max(1, math.ceil(len(layers) / 40))  # at most ~40 readable labels
    ax.set_yticks(range(0, len(layers), every))
    ax.set_yticklabels(layers[::every], fontsize=7)


def _grids(run: Run, stat: str, scale: float, source: str = "quant"):
    """(steps, layers, {operand: layers x steps array}) of one statistic; NaN where absent."""
    table = quant_table(run, stat, source)
    steps = sorted({s for layers in table.values() for per in layers.values() for s in per})
    layers = list(dict.fromkeys(n for per in table.values() for n in per))  # model order
    grids = {}
    for op, per in table.items():
        g = np.full((len(layers), len(steps)), np.nan)
        for r, name in enumerate(layers):
            for c, s in enumerate(steps):
                g[r, c] = per.get(name, {}).get(s, np.nan) * scale
        grids[op] = g
    return steps, layers, grids


def color_limits(runs: list[Run], stat: str, scale: float = 1.0, log: bool = False):
    """(vmin, vmax) of one statistic over every run and its shadow recipes: one colour scale
    per statistic, so the same colour means the same value in every heatmap. None without
    data."""
    vals = [
        g[np.isfinite(g)]
        for run in runs
        for source in ["quant", *shadow_sources(run)]
        for g in _grids(run, stat, scale, source)[2].values()
    ]
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[v > 0] if log else v  # a log colour scale has no place for zero
    return (float(v.min()), float(v.max())) if v.size else None


def _step_ticks(ax, steps: list[int]) -> None:
    """Ticks on logged steps only (at most ~12): the cell edges are not steps."""
    every = max(1, math.ceil(len(steps) / 12))
    ax.set_xticks(steps[::every])
    ax.set_xticklabels([str(s) for s in steps[::every]])


def heatmap_figure(
    run: Run,
    stat: str,
    label: str,
    cmap: str,
    scale: float = 1.0,
    limits: tuple[float, float] | None = None,
    log: bool = False,
    source: str = "quant",
) -> Figure | None:
    """Layers x steps of one statistic, one panel per GEMM operand, guard fallbacks marked.
    `limits`: the colour scale (`color_limits` over all runs); default: this run's range.
    `source`: the run's own recipe, or a shadow recipe (`shadow/<recipe>`)."""
    steps, layers, grids = _grids(run, stat, scale, source)
    if not grids:
        return None
    vmin, vmax = limits or color_limits([run], stat, scale, log) or (1.0, 10.0)
    norm = LogNorm(vmin, vmax) if log else Normalize(vmin, vmax)
    height = 0.6 + max(1.2, 0.16 * len(layers))
    fig, axes = plt.subplots(len(grids), 1, figsize=(10, height * len(grids) + 0.8),
                             sharex=True, squeeze=False, layout="constrained")  # fmt: skip
    # Grey: no value (the layer has no such operand, or it stopped quantizing).
    cm = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
    guards = [e for e in run.events if e["kind"] == "guard"]
    x_edges = _edges(steps)
    y_edges = np.arange(len(layers) + 1) - 0.5
    for ax, (op, g) in zip(axes[:, 0], grids.items(), strict=True):
        g = np.where(g > 0, g, np.nan) if log else g  # zero has no colour on a log scale
        im = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(g), cmap=cm, norm=norm)
        ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top
        for j, e in enumerate(guards):
            if e["layer"] in layers:
                row = layers.index(e["layer"])
                ax.scatter([e["step"]], [row], marker="v", s=60, color="white", edgecolor="black",
                           zorder=5, label="guard fallback" if j == 0 else None)  # fmt: skip
        ax.set_title(f"{op}", fontsize=9, loc="left")
        _layer_ticks(ax, layers)
        ax.set_ylabel("layer")
        if guards:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    _step_ticks(axes[-1, 0], steps)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label=label, shrink=0.9)
    whose = f"{run.name}" if source == "quant" else f"{run.name}, {source[7:]} shadow"
    fig.suptitle(f"{whose}: {label} per layer and GEMM operand over training")
    return fig


def _edges(steps: list[int]) -> np.ndarray:
    """Cell edges around each step (midpoints between neighbours): irregular steps stay put."""
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


# What "dec" means on the scale plots (algorithms.md, enc / dec): the page repeats it.
DEC = "dec: the decode scale, x_hat = q * dec (1 / the encode scale)"


def _layer_lines(ax, per: dict[str, dict[int, float]]) -> None:
    """One line per layer over steps, coloured in model order (viridis: first dark)."""
    cmap = plt.get_cmap("viridis")
    for k, name in enumerate(per):
        steps = sorted(per[name])
        ax.plot(steps, [per[name][s] for s in steps], color=cmap(k / max(1, len(per) - 1)),
                lw=1.2, label=name)  # fmt: skip
    ax.grid(alpha=0.3)


def _panels(run: Run, panels: list[tuple[str, dict, str, bool]], title: str) -> Figure:
    """Stacked panels of per-layer lines: (panel title, {layer: {step: value}}, y label, log)."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels) + 0.8), sharex=True,
                             squeeze=False, layout="constrained")  # fmt: skip
    for ax, (name, per, ylabel, log) in zip(axes[:, 0], panels, strict=True):
        _layer_lines(ax, per)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("step")
    steps = {s for _, per, _, _ in panels for by_step in per.values() for s in by_step}
    _step_ticks(axes[-1, 0], sorted(steps))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if len(labels) > 24:  # a legend that long reads worse than the colour order alone
        handles, labels = handles[:: len(labels) // 12], labels[:: len(labels) // 12]
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="layer")
    fig.suptitle(f"{run.name}: {title}")
    return fig


def scale_figure(run: Run) -> Figure | None:
    """Scale traces: per-tensor scales, or the largest block scale, of every layer over time."""
    tables = {**quant_table(run, "scale_max"), **quant_table(run, "scale")}
    panels = [(op, tables[op], "scale (dec)", True) for op in OPERANDS if op in tables]
    if not panels:
        return None
    fig = _panels(run, panels, "scale per layer (per-tensor, or the largest block scale)")
    fig.text(0.01, 0.005, DEC, fontsize=8, color="#444")
    return fig


# Per-weight rows of layers.jsonl (observe/runner.py): key pattern -> (panel, y label, log).
WEIGHT_STATS = {
    "grad/{}/norm": ("gradient norm", "||g||", True),
    "weight/{}/update_ratio": ("update ratio ||W_after - W_before|| / ||W_before||", "ratio", True),
    "grad/{}/cosine": ("gradient fidelity: cosine to the high-precision gradient", "cosine", False),
    "grad/{}/alignment": (
        "gradient fidelity: alignment <g_hat, g> / <g, g> (1: unbiased)",
        "alignment",
        False,
    ),
}


def weight_table(run: Run, pattern: str) -> dict[str, dict[int, float]]:
    """{layer: {step: value}} of one per-weight statistic (`pattern` as in WEIGHT_STATS)."""
    head, tail = pattern.split("{}")
    out: dict[str, dict[int, float]] = {}
    for row in run.layers:
        for key, value in row.items():
            if key.startswith(head) and key.endswith(tail) and value is not None:
                out.setdefault(key[len(head) : -len(tail)], {})[row["step"]] = value
    return out


def weights_figure(run: Run) -> Figure | None:
    """Gradient norms, update ratios and gradient fidelity per layer, those that were recorded."""
    panels = []
    for pattern, (name, ylabel, log) in WEIGHT_STATS.items():
        per = weight_table(run, pattern)
        if per:
            panels.append((name, per, ylabel, log))
    if not panels:
        return None
    return _panels(run, panels, "gradients and updates per layer")


def series_labels(fig: Figure) -> list[str]:
    """The labelled series of a figure (what its legends list, each once), for the manifest
    and tests."""
    return list(dict.fromkeys(lb for ax in fig.axes for lb in ax.get_legend_handles_labels()[1]))
