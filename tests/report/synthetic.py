"""Run directories written directly (no training): config.yaml, metrics.jsonl, layers.jsonl."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_run(
    d: Path,
    name: str,
    steps: int,
    planned: int,
    loss: Callable[[int], float],
    val: dict[int, float] | None = None,
    layers: list[dict] | None = None,
    tokens_per_step: int = 100,
) -> Path:
    """A run named `name` that logged training loss `loss(step)` at steps 1..steps of
    `planned` (run.max_steps), validation losses `val` {step: loss} and layer rows `layers`."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"run: {{name: {name}, max_steps: {planned}}}\nprecision: {{recipe: nvfp4}}\n"
    )
    rows = [
        {"step": s, "loss": loss(s), "tokens": s * tokens_per_step, "tokens_per_s": 1000.0}
        for s in range(1, steps + 1)
    ]
    rows += [{"step": s, "val_loss": v} for s, v in (val or {}).items()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "layers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in layers or []))
    return d
