"""The report's summary table: one row of numbers per run.

Gaps to the first run compare like with like at a common step: validation loss at the last
step both runs evaluated, or else the trailing-mean training loss at the last step both
reached (`Gap.basis` says which). A run compared at its final loss against a longer or shorter
one would measure training length, not precision.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from lptrain.report.runs import Run


@dataclass(frozen=True)
class Summary:
    name: str
    recipe: str
    steps: int
    tokens: float
    planned_steps: int | None  # from run.max_steps / run.max_tokens; None without a config
    in_progress: bool  # fewer steps logged than planned (still running, or stopped early)
    train_loss: float | None  # mean over the last 10% of logged training steps
    val_loss: float | None  # the last evaluation
    gap_pct: float | None  # to the first run, on `gap_basis`
    gap_basis: str  # "validation at step N", "train (trailing mean) at step N", or why none
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


def train_loss_at(run: Run, step: int) -> float | None:
    """Trailing mean of the training loss over the last 10% of steps up to `step` (at least
    the last logged row at or before it): the same step window for every run compared."""
    rows = [r for r in run.train if r["step"] <= step and r.get("loss") is not None]
    if not rows:
        return None
    lo = step - max(1, step // 10)
    window = [r["loss"] for r in rows if r["step"] > lo] or [rows[-1]["loss"]]
    return sum(window) / len(window)


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else 100 * (a - b) / b


def gap(run: Run, ref: Run) -> tuple[float | None, str]:
    """(gap in %, basis): validation at the last step both evaluated, else training loss at the
    last step both reached. Never validation against training loss."""
    vals = [{r["step"]: r["val_loss"] for r in x.evals if r.get("val_loss") is not None}
            for x in (run, ref)]  # fmt: skip
    common = sorted(set(vals[0]) & set(vals[1]))
    if common:
        s = common[-1]
        return _pct(vals[0][s], vals[1][s]), f"validation at step {s}"
    if run.train and ref.train:
        s = min(run.train[-1]["step"], ref.train[-1]["step"])
        pct = _pct(train_loss_at(run, s), train_loss_at(ref, s))
        if pct is not None:
            return pct, f"train (trailing mean) at step {s}"
    return None, "no common metric"


def planned_steps(run: Run) -> int | None:
    """The step the run stops at: run.max_steps, or run.max_tokens in steps (the smaller)."""
    cfg = run.config.get("run", {}) if isinstance(run.config.get("run"), dict) else {}
    limits = [cfg["max_steps"]] if isinstance(cfg.get("max_steps"), int) else []
    first = next((r for r in run.train if r.get("tokens")), None)
    if isinstance(cfg.get("max_tokens"), int) and first is not None:
        limits.append(math.ceil(cfg["max_tokens"] / (first["tokens"] / first["step"])))
    return min(limits) if limits else None


def summarize(runs: list[Run]) -> list[Summary]:
    out = []
    for run in runs:
        last = run.train[-1] if run.train else {}
        rates = [r["tokens_per_s"] for r in run.train if r.get("tokens_per_s")]
        kinds = [e["kind"] for e in run.events]
        plan = planned_steps(run)
        pct, basis = (0.0, "reference") if run is runs[0] else gap(run, runs[0])
        out.append(
            Summary(
                name=run.name,
                recipe=run.recipe,
                steps=int(last.get("step", 0)),
                tokens=float(last.get("tokens") or 0),
                planned_steps=plan,
                in_progress=plan is not None and int(last.get("step", 0)) < plan,
                train_loss=_final_train(run),
                val_loss=_final_val(run),
                gap_pct=pct,
                gap_basis=basis,
                tokens_per_s=statistics.median(rates) if rates else None,
                skipped=int(last.get("skipped_steps") or 0),
                spikes=kinds.count("spike"),
                diverged="divergence" in kinds,
                guard=[e for e in run.events if e["kind"] == "guard"],
            )
        )
    return out


def text(rows: list[Summary]) -> str:
    """The summary as lines for the terminal: steps (and whether the run is still short of its
    plan), final losses, the gap and its basis."""
    lines = []
    for s in rows:
        steps = f"step {s.steps}" + (f"/{s.planned_steps}" if s.planned_steps else "")
        state = " IN PROGRESS" if s.in_progress else ""
        loss = "-" if s.train_loss is None else f"{s.train_loss:.4f}"
        val = "" if s.val_loss is None else f" val {s.val_loss:.4f}"
        g = "-" if s.gap_pct is None else f"{s.gap_pct:+.2f}%"
        lines.append(f"{s.name}: {steps}{state}, train {loss}{val}, gap {g} ({s.gap_basis})")
    return "\n".join(lines)
