"""`lptrain report RUN_DIR [RUN_DIR ...] [--out DIR]`: plots and one HTML page from run
directories alone (offline, no W&B).

Writes into DIR: loss.png (loss and validation loss against tokens, every run), gap.png (gap
to the first run), per run with per-layer rows one heatmap per recorded statistic (HEATMAPS:
layers x steps, one panel per GEMM operand, one colour scale per statistic across runs),
scales-<run>.png (scale traces) and weights-<run>.png (gradient norms, update ratios, gradient
fidelity), report.html (the summary table, every figure embedded, the events), report.json
(what each figure shows: its series, for scripts and tests) and report.txt (the summary as
text, which the CLI prints).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lptrain.report import page
from lptrain.report.runs import Run, RunError, read_runs
from lptrain.report.summary import summarize
from lptrain.report.summary import text as summary_text

__all__ = ["RunError", "build", "read_runs"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


# Per-layer heatmaps, one per recorded statistic: (stat, file prefix, colour bar label, colour
# map, multiplier, log colour scale, caption). The first two show on the page; the others fold
# under "more statistics" to keep the page readable.
HEATMAPS = (
    ("sqnr_db", "sqnr", "SQNR (dB)", "viridis", 1.0, False,
     "Signal to quantization noise, 10 log10(|x|^2 / |x - x_hat|^2): higher is better."),
    ("saturated", "saturation", "saturated elements (%)", "magma", 100.0, False,
     "Elements beyond the format's largest value after scaling: they clip."),
    ("underflow", "underflow", "underflowed non-zero elements (%)", "magma", 100.0, False,
     "Non-zero elements that quantize to zero."),
    ("clamped", "clamped", "clamped scale groups (%)", "magma", 100.0, False,
     "Scale groups whose scale hit the scale format's range (the scale itself saturated or "
     "flushed)."),
    ("amax", "amax", "amax (max |x|)", "viridis", 1.0, True,
     "Largest magnitude of the operand (log colour scale)."),
    ("dynamic_range", "dynamic-range", "dynamic range (bits)", "viridis", 1.0, False,
     "log2(max |x| / min non-zero |x|): bits of range the operand spans."),
    # Opt-in statistics (monitor.stats): a figure only for runs that recorded them.
    ("block_range_exceeded", "block-range-exceeded", "32-blocks beyond the format's range (%)",
     "magma", 100.0, False,
     "Non-zero 32-element blocks whose own dynamic range exceeds the element format's "
     "(log2(max / min subnormal)): even a per-block scale loses their smallest elements."),
    ("block_dynamic_range", "block-dynamic-range", "largest in-block dynamic range (bits)",
     "viridis", 1.0, False,
     "max over 32-element blocks of log2(max |x| / min non-zero |x|) within the block."),
)  # fmt: skip
# A shadow recipe's heatmaps (monitor.shadow), on the colour scales of the run's own: the first
# open on the page, the second folded.
SHADOW_HEATMAPS = ("sqnr_db", "underflow")
SHOWN = 2  # the first HEATMAPS open on the page


@dataclass(frozen=True)
class Figure:
    file: str
    section: str
    alt: str
    caption: str
    folded: bool  # under a collapsed "more statistics" on the page
    fig: object  # a matplotlib Figure, or None (no data)


def _figures(runs: list[Run]):
    """The figures, in page order."""
    from lptrain.report import plots  # optional dependency: plots imports matplotlib (train extra)

    loss_note = "Thin: every logged step; thick: trailing mean over 5% of the steps."
    yield Figure("loss.png", "Loss", "loss and validation loss against tokens", loss_note, False,
                 plots.loss_figure(runs))  # fmt: skip
    gap_note = (
        "Validation against validation where both runs evaluated, else trailing-mean training "
        "loss against the same; only over the tokens both runs reached."
    )
    yield Figure("gap.png", "Loss", "loss gap to the first run", gap_note, False,
                 plots.gap_figure(runs))  # fmt: skip
    # One colour scale per statistic across runs: the same colour is the same value everywhere.
    limits = {h[0]: plots.color_limits(runs, h[0], h[4], h[5]) for h in HEATMAPS}
    for run in runs:
        slug = _slug(run.name)
        section = f"Per layer: {run.name}"
        for k, (stat, prefix, label, cmap, mult, log, note) in enumerate(HEATMAPS):
            fig = plots.heatmap_figure(run, stat, label, cmap, mult, limits[stat], log)
            yield Figure(f"{prefix}-{slug}.png", section, f"{run.name} {label} heatmap",
                         note + " Colour scale shared by every run.", k >= SHOWN, fig)  # fmt: skip
        for source in plots.shadow_sources(run):
            recipe = source.split("/", 1)[1]
            heatmaps = [h for h in HEATMAPS if h[0] in SHADOW_HEATMAPS]
            for k, (stat, prefix, label, cmap, mult, log, note) in enumerate(heatmaps):
                fig = plots.heatmap_figure(run, stat, label, cmap, mult, limits[stat], log,
                                           source)  # fmt: skip
                yield Figure(f"shadow-{_slug(recipe)}-{prefix}-{slug}.png", section,
                             f"{run.name} {recipe} shadow {label} heatmap",
                             f"What {recipe} would give on the same operands (monitor.shadow; "
                             f"training unchanged). {note} Colour scale shared with the run's "
                             "own.", k > 0, fig)  # fmt: skip
        yield Figure(f"scales-{slug}.png", section, f"{run.name} scale traces",
                     "Scale per layer and operand over training; " + plots.DEC + ".", False,
                     plots.scale_figure(run))  # fmt: skip
        yield Figure(f"weights-{slug}.png", section, f"{run.name} gradients and updates",
                     "Per layer: weight-gradient L2 norm, update ratio, and the gradient "
                     "fidelity probe's cosine and alignment (those monitor.* recorded).", True,
                     plots.weights_figure(run))  # fmt: skip


def build(paths: list[str], out: str | Path) -> Path:
    """Read the runs, write the PNGs, report.html and report.json into `out`; returns the page."""
    import matplotlib.pyplot as plt  # optional dependency (the train extra)

    from lptrain.report import plots  # optional dependency: plots imports matplotlib (train extra)

    runs = read_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, placed = {}, []
    for f in _figures(runs):
        if f.fig is None:
            continue
        f.fig.savefig(out / f.file, dpi=110)
        manifest[f.file] = {"section": f.section, "series": plots.series_labels(f.fig)}
        plt.close(f.fig)
        placed.append(page.Placed(f.section, f.alt, f.caption, f.folded, out / f.file))
    summary = summarize(runs)
    events = [(run.name, e) for run in runs for e in run.events if e["kind"] != "resume"]
    title = "lptrain report: " + ", ".join(r.name for r in runs)
    (out / "report.html").write_text(page.render(title, summary, placed, events))
    (out / "report.txt").write_text(summary_text(summary) + "\n")
    (out / "report.json").write_text(
        json.dumps({"figures": manifest, "summary": [asdict(s) for s in summary]}, indent=1)
    )
    return out / "report.html"
