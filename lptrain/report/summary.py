"""The report's summary table: one row of numbers per run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from lptrain.report.runs import Run


@dataclass(frozen=True)
class Summary:
    name: str
    recipe: str
    steps: int
    tokens: float
    train_loss: float | None  # mean over the last 10% of logged training steps
    val_loss: float | None  # the last evaluation
    gap_pct: float | None  # to the first run: validation if both have it, else train
    tokens_per_s: float | None  # median over the logged steps
    skipped: int
    spikes: int
    diverged: bool
    guard: list[dict]  # the guard's fallback events


def _final_train(run: Run) -> float | None:
    losses = [r["loss"] for r in run.train if r.get("loss") is not None]
    if not losses:
        return None
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def _final_val(run: Run) -> float | None:
    vals = [r["val_loss"] for r in run.evals if r.get("val_loss") is not None]
    return vals[-1] if vals else None


def _gap(run: Run, ref: Run) -> float | None:
    a, b = _final_val(run), _final_val(ref)
    if a is None or b is None:
        a, b = _final_train(run), _final_train(ref)
    if a is None or b is None or b == 0:
        return None
    return 100 * (a - b) / b


def summarize(runs: list[Run]) -> list[Summary]:
    out = []
    for run in runs:
        last = run.train[-1] if run.train else {}
        rates = [r["tokens_per_s"] for r in run.train if r.get("tokens_per_s")]
        kinds = [e["kind"] for e in run.events]
        out.append(
            Summary(
                name=run.name,
                recipe=run.recipe,
                steps=int(last.get("step", 0)),
                tokens=float(last.get("tokens") or 0),
                train_loss=_final_train(run),
                val_loss=_final_val(run),
                gap_pct=_gap(run, runs[0]) if run is not runs[0] else 0.0,
                tokens_per_s=statistics.median(rates) if rates else None,
                skipped=int(last.get("skipped_steps") or 0),
                spikes=kinds.count("spike"),
                diverged="divergence" in kinds,
                guard=[e for e in run.events if e["kind"] == "guard"],
            )
        )
    return out
