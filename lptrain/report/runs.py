"""Reading run directories back: only the files a run writes, so reports work offline.

metrics.jsonl (training rows carry `loss`, evaluation rows `val_loss`), layers.jsonl (per-layer
rows), events.jsonl (spikes, guard fallbacks, skipped steps, reloads, resumes) and config.yaml.
Runs that were interrupted and resumed repeat steps: a row marked `superseded` is dropped and,
when a step repeats, its last row wins. Events logged after the checkpoint a run resumed from
(a `resume` event says which step) are dropped too: the resumed run logs them again. A line cut
short by a kill is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class RunError(ValueError):
    """A path that is not a readable run directory; the CLI prints it as one line."""


@dataclass
class Run:
    path: Path
    name: str
    recipe: str
    config: dict
    train: list[dict] = field(default_factory=list)  # by step
    evals: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    _tokens: dict | None = field(default=None, repr=False)

    def series(self, rows: list[dict], key: str) -> tuple[list[float], list[float]]:
        """(tokens, values) of `key` over `rows`, skipping missing and null values."""
        tokens = self.tokens_at()
        xs, ys = [], []
        for r in rows:
            if r.get(key) is not None and r["step"] in tokens:
                xs.append(tokens[r["step"]])
                ys.append(r[key])
        return xs, ys

    def tokens_at(self) -> dict[int, float]:
        """Tokens seen at each step of any row (see `tokens`)."""
        steps = {r["step"] for rows in (self.train, self.evals, self.layers) for r in rows}
        return {s: self.tokens(s) for s in steps}

    def tokens(self, step: int) -> float:
        """Tokens seen after `step`: as logged on its training row, or steps x tokens per step
        (evaluation, layer and event rows, steps between logged ones)."""
        if self._tokens is None:
            self._tokens = {r["step"]: r["tokens"] for r in self.train if r.get("tokens")}
        if step in self._tokens:
            return float(self._tokens[step])
        per_step = next((t / s for s, t in sorted(self._tokens.items()) if s), 0.0)
        return step * per_step


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def last_per_step(rows: list[dict]) -> list[dict]:
    """Drop superseded rows; of rows repeating a step keep the last; sort by step."""
    kept: dict[int, dict] = {}
    for row in rows:
        if not row.get("superseded"):
            kept[row["step"]] = row
    return [kept[s] for s in sorted(kept)]


def live_events(events: list[dict]) -> list[dict]:
    """Events in log order, without those a later resume re-ran (step after its checkpoint)."""
    out: list[dict] = []
    for ev in events:
        if ev.get("superseded"):
            continue
        if ev.get("kind") == "resume":
            out = [e for e in out if e["step"] <= ev["step"]]
        out.append(ev)
    return out


def _recipe_name(config: dict) -> str:
    recipe = config.get("precision", {}).get("recipe", "?")
    return recipe if isinstance(recipe, str) else str(recipe.get("name", "custom"))


def read_run(path: str | Path) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"{path}: no such directory")
    if not (p / "metrics.jsonl").is_file():
        raise RunError(f"{path}: not a run directory (no metrics.jsonl)")
    try:
        config = (
            yaml.safe_load((p / "config.yaml").read_text()) if (p / "config.yaml").is_file() else {}
        )
    except yaml.YAMLError:
        raise RunError(f"{path}: config.yaml is not valid YAML") from None
    config = config if isinstance(config, dict) else {}
    metrics = _read_jsonl(p / "metrics.jsonl")
    return Run(
        path=p,
        name=str(config.get("run", {}).get("name") or p.name),
        recipe=_recipe_name(config),
        config=config,
        train=last_per_step([r for r in metrics if "loss" in r]),
        evals=last_per_step([r for r in metrics if "val_loss" in r]),
        layers=last_per_step(_read_jsonl(p / "layers.jsonl")),
        events=live_events(_read_jsonl(p / "events.jsonl")),
    )


def read_runs(paths: list[str]) -> list[Run]:
    """The runs, each labelled by its name, or name + directory when names repeat."""
    runs = [read_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.name})"
    return runs
