"""`lptrain report RUN_DIR [RUN_DIR ...] [--out DIR]`: plots and one HTML page from run
directories alone (offline, no W&B).

Writes into DIR: loss.png (loss and validation loss against tokens, every run), gap.png (gap
to the first run), per run with per-layer rows sqnr-<run>.png, saturation-<run>.png (heatmaps:
layers x steps, one panel per GEMM operand) and scales-<run>.png (scale traces), report.html
(the summary table, every figure embedded, the events) and report.json (what each figure
shows: its series, for scripts and tests).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from lptrain.report import page
from lptrain.report.runs import Run, RunError, read_runs
from lptrain.report.summary import summarize

__all__ = ["RunError", "build", "read_runs"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def _figures(runs: list[Run]):
    """(file name, section, alt text, figure or None), in page order."""
    from lptrain.report import plots  # optional dependency: plots imports matplotlib (train extra)

    yield "loss.png", "Loss", "loss and validation loss against tokens", plots.loss_figure(runs)
    yield "gap.png", "Loss", "loss gap to the first run", plots.gap_figure(runs)
    for run in runs:
        slug = _slug(run.name)
        section = f"Per layer: {run.name}"
        yield (
            f"sqnr-{slug}.png",
            section,
            f"{run.name} SQNR heatmap",
            plots.heatmap_figure(run, "sqnr_db", "SQNR (dB)", "viridis"),
        )
        yield (
            f"saturation-{slug}.png",
            section,
            f"{run.name} saturation heatmap",
            (plots.heatmap_figure(run, "saturated", "saturated elements (%)", "magma", 100.0)),
        )
        yield f"scales-{slug}.png", section, f"{run.name} scale traces", plots.scale_figure(run)


def build(paths: list[str], out: str | Path) -> Path:
    """Read the runs, write the PNGs, report.html and report.json into `out`; returns the page."""
    import matplotlib.pyplot as plt  # optional dependency (the train extra)

    from lptrain.report import plots  # optional dependency: plots imports matplotlib (train extra)

    runs = read_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, placed = {}, []
    for fname, section, alt, fig in _figures(runs):
        if fig is None:
            continue
        fig.savefig(out / fname, dpi=110)
        manifest[fname] = {"section": section, "series": plots.series_labels(fig)}
        plt.close(fig)
        placed.append((section, alt, out / fname))
    summary = summarize(runs)
    events = [(run.name, e) for run in runs for e in run.events if e["kind"] != "resume"]
    title = "lptrain report: " + ", ".join(r.name for r in runs)
    (out / "report.html").write_text(page.render(title, summary, placed, events))
    (out / "report.json").write_text(
        json.dumps({"figures": manifest, "summary": [asdict(s) for s in summary]}, indent=1)
    )
    return out / "report.html"
