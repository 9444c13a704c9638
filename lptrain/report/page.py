"""One self-contained HTML page: the summary table, every figure (embedded as PNG data, so the
file can be mailed or moved alone), and the events. No external resource is referenced.

A few lines of script count the images that decoded and say so at the bottom of the page (a
browser test reads it); the page is complete without script.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import NamedTuple

from lptrain.report.summary import Summary

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.bad { color: #b00; font-weight: bold; } .note { color: #666; font-size: 0.85em; }
.live { color: #a60; font-weight: bold; } figcaption { color: #444; font-size: 0.85em; }
figure { margin: 0.5em 0 1.2em; } summary { cursor: pointer; margin: 0.6em 0; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  document.getElementById("loaded").textContent = ok === imgs.length
    ? "All " + ok + " figures loaded." : ok + " of " + imgs.length + " figures loaded.";
});
"""


def _num(v, fmt: str) -> str:
    return "&ndash;" if v is None else format(v, fmt)


def _summary_table(rows: list[Summary]) -> str:
    head = (
        "<tr><th class=l>run</th><th class=l>recipe</th><th>steps</th><th>tokens</th>"
        "<th>final train loss</th><th>final val loss</th><th>gap to first (%)</th>"
        "<th class=l>gap basis</th>"
        "<th>tokens/s</th><th>skipped steps</th><th>loss spikes</th><th>diverged</th>"
        "<th>guard fallbacks</th></tr>"
    )
    body = []
    for s in rows:
        body.append(
            f"<tr><td class=l>{html.escape(s.name)}</td><td class=l>{html.escape(s.recipe)}</td>"
            f"<td>{_steps(s)}</td><td>{s.tokens:,.0f}</td><td>{_num(s.train_loss, '.4f')}</td>"
            f"<td>{_num(s.val_loss, '.4f')}</td><td>{_num(s.gap_pct, '+.2f')}</td>"
            f"<td class=l>{html.escape(s.gap_basis)}</td>"
            f"<td>{_num(s.tokens_per_s, ',.0f')}</td>"
            f"<td{' class=bad' if s.skipped else ''}>{s.skipped}</td>"
            f"<td{' class=bad' if s.spikes else ''}>{s.spikes}</td>"
            f"<td{' class=bad' if s.diverged else ''}>{'yes' if s.diverged else 'no'}</td>"
            f"<td{' class=bad' if s.guard else ''}>{len(s.guard)}</td></tr>"
        )
    note = (
        "<p class=note>Steps: the last logged step / the planned one (run.max_steps or "
        "run.max_tokens); <span class=live>in progress</span> marks a run short of its plan "
        "(still running, or stopped early). Final train loss: mean over the last 10% of logged "
        "steps. Gap to the first run at a common step, like with like: validation loss at the "
        "last step both evaluated, else the training loss (trailing mean over the last 10% of "
        "steps) at the last step both reached; the basis column says which. Tokens/s: median "
        "over logged steps.</p>"
    )
    return f"<table>{head}{''.join(body)}</table>{note}"


def _steps(s: Summary) -> str:
    planned = f" / {s.planned_steps}" if s.planned_steps is not None else ""
    live = " <span class=live>in progress</span>" if s.in_progress else ""
    return f"{s.steps}{planned}{live}"


def _events_table(events: list[tuple[str, dict]]) -> str:
    if not events:
        return "<p>No events: no loss spikes, guard fallbacks, skipped steps or reloads.</p>"
    rows = []
    for run, e in events:
        detail = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in e.items()
            if k not in ("kind", "step")
        )
        rows.append(
            f"<tr><td class=l>{html.escape(run)}</td><td>{e['step']}</td>"
            f"<td class=l>{html.escape(e['kind'])}</td><td class=l>{html.escape(detail)}</td></tr>"
        )
    head = (
        "<tr><th class=l>run</th><th>step</th><th class=l>event</th><th class=l>details</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


class Placed(NamedTuple):
    """A figure on the page: its section heading, alt text, caption, whether it folds under
    the section's collapsed "more statistics", and its PNG."""

    section: str
    alt: str
    caption: str
    folded: bool
    png: Path


def _img(f: Placed) -> str:
    data = base64.b64encode(f.png.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(f.alt)}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
    )


def _sections(figures: list[Placed]) -> list[str]:
    """Each section's open figures, then its folded ones in one collapsed <details>."""
    order = list(dict.fromkeys(f.section for f in figures))
    parts = []
    for section in order:
        parts.append(f"<h2>{html.escape(section)}</h2>")
        parts += [_img(f) for f in figures if f.section == section and not f.folded]
        folded = [_img(f) for f in figures if f.section == section and f.folded]
        if folded:
            parts.append(
                f"<details><summary>More statistics ({len(folded)} figures)</summary>"
                + "".join(folded)
                + "</details>"
            )
    return parts


def render(
    title: str,
    summary: list[Summary],
    figures: list[Placed],
    events: list[tuple[str, dict]],
) -> str:
    """figures in page order."""
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style>",
        f"<script>{SCRIPT}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Summary</h2>",
        _summary_table(summary),
    ]
    parts += _sections(figures)
    parts += ["<h2>Events</h2>", _events_table(events)]
    parts.append("<p class=note id=loaded>Figures are embedded PNG images.</p></body></html>")
    return "\n".join(parts)
