"""Reading run directories (report/runs.py): resumed runs, cut lines, bad paths."""

from __future__ import annotations

import json

import pytest

from lptrain.cli import main
from lptrain.report.runs import RunError, read_run, read_runs


def _write(run_dir, name, rows, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_a_resumed_run_reads_as_one_row_per_step(tmp_path):
    d = tmp_path / "run"
    (tmp_path / "run").mkdir()
    (d / "config.yaml").write_text("run: {name: mine}\nprecision: {recipe: nvfp4}\n")
    train = [{"step": s, "loss": 5.0 - s / 10, "tokens": 100 * s} for s in (1, 2, 3, 4)]
    redone = [{"step": s, "loss": 9.0, "tokens": 100 * s} for s in (3, 4)]  # after a resume
    marked = {"step": 5, "loss": 1.0, "tokens": 500, "superseded": True}
    _write(d, "metrics.jsonl", [*train, {"step": 2, "val_loss": 4.5}, *redone, marked],
           tail='{"step": 6, "loss": 4')  # fmt: skip  # a line cut short by a kill
    events = [
        {"kind": "spike", "step": 2},
        {"kind": "guard", "step": 4, "layer": "a"},  # logged, then re-run after the resume
        {"kind": "resume", "step": 3},
        {"kind": "guard", "step": 4, "layer": "a"},
    ]
    _write(d, "events.jsonl", events)
    run = read_run(d)
    assert run.name == "mine" and run.recipe == "nvfp4"
    assert [(r["step"], r["loss"]) for r in run.train] == [(1, 4.9), (2, 4.8), (3, 9.0), (4, 9.0)]
    assert [r["step"] for r in run.evals] == [2] and run.tokens(2) == 200 and run.tokens(7) == 700
    assert [e["kind"] for e in run.events] == ["spike", "resume", "guard"]
    assert run.layers == []


def test_repeated_names_are_told_apart(tmp_path):
    for sub in ("a", "b"):
        _write(tmp_path / sub, "metrics.jsonl", [{"step": 1, "loss": 1.0, "tokens": 1}])
        (tmp_path / sub / "config.yaml").write_text("run: {name: same}\n")
    assert [r.name for r in read_runs([tmp_path / "a", tmp_path / "b"])] == ["same (a)", "same (b)"]


def test_bad_run_directories_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(RunError, match="no such directory"):
        read_run(tmp_path / "missing")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: not a run directory (no metrics.jsonl)"
