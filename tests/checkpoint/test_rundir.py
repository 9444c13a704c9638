"""The run directory's files (checkpoint/rundir.py): metrics rewind, --archive, the W&B run id,
and which directories --run-dir may name."""

from __future__ import annotations

import json

import pytest

from lptrain.checkpoint import rundir, store
from lptrain.checkpoint.resume import Plan
from lptrain.errors import ConfigError
from lptrain.testing import checkpoints as fake


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rewind_moves_later_rows_aside_and_loses_nothing(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"step": 4, "val_loss": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo'  # cut by a kill
    (tmp_path / rundir.METRICS).write_text(text)
    rundir.rewind_metrics(tmp_path, 4)
    kept = _rows(tmp_path / rundir.METRICS)
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4]
    moved = _rows(tmp_path / rundir.SUPERSEDED)
    assert [r.get("step") for r in moved] == [5, 6, 7, None]
    assert all(r["superseded_at"] == 4 for r in moved)
    assert moved[-1]["unparsed"] == '{"step": 8, "lo'
    rundir.rewind_metrics(tmp_path, 2)  # a second rewind appends
    assert [r.get("step") for r in _rows(tmp_path / rundir.SUPERSEDED)][-3:] == [3, 4, 4]
    rundir.rewind_metrics(tmp_path / "nothing-here", 3)  # no metrics yet: nothing to do


def test_archive_moves_everything_or_only_newer_checkpoints(tmp_path):
    run = tmp_path / "run"
    for s in (2, 4, 6):
        fake.save(run / "checkpoints", s)
    (run / rundir.METRICS).write_text('{"step": 1}\n')
    rundir.write_run_files(run, "run: {}\n", {"train_batch_size": 8})
    rundir.write_run_json(run, "abc")
    dest = rundir.archive(run, ("step00000006",))  # back to step 4: 6 goes, latest follows
    assert store.list_tags(run / "checkpoints") == ["step00000002", "step00000004"]
    assert store.read_latest(run / "checkpoints") == "step00000004"
    assert store.list_tags(dest / "checkpoints") == ["step00000006"]
    assert (dest / rundir.METRICS).read_text() == (run / rundir.METRICS).read_text()
    dest = rundir.archive(run)  # a fresh start: the whole earlier run
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["checkpoints", "config.yaml", "deepspeed.json", rundir.METRICS, rundir.RUN_JSON]
    )
    assert not store.has_checkpoints(run / "checkpoints")
    assert rundir.wandb_id(dest) == "abc" and rundir.wandb_id(run) is None


def test_prepare_keeps_the_wandb_id_on_resume_and_makes_a_new_one_when_fresh(tmp_path):
    run = tmp_path / "run"
    fake.save(run / "checkpoints", 4)
    found = store.newest_verified(run / "checkpoints")[0]
    first = rundir.prepare(run, Plan(None), "a: 1\n", {}, print)
    assert rundir.prepare(run, Plan(found), "a: 2\n", {}, print) == first
    assert (run / "config.yaml").read_text() == "a: 2\n"
    again = rundir.prepare(run, Plan(None, archive_all=True), "a: 3\n", {}, print)
    assert again != first and len(again) == 8


def test_run_dir_may_be_new_empty_or_a_run_directory_but_not_another_folder(tmp_path):
    rundir.check_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    rundir.check_target(tmp_path / "empty")
    run = tmp_path / "run"
    fake.save(run / "checkpoints", 2)
    (run / "config.yaml").write_text("run: {}\n")
    rundir.check_target(run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")  # what training would overwrite
    (mine / "notes.txt").write_text("")
    with pytest.raises(ConfigError) as exc:
        rundir.check_target(mine)
    assert exc.value.path == "--run-dir"
    assert exc.value.problem.startswith(
        f"{mine} is not empty (config.yaml, notes.txt) and is not an lptrain run directory"
    )


def test_lptrain_train_into_another_folder_is_refused_and_writes_nothing(cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    proc = cli("tiny-fp32.yaml", "run.max_steps=1", run_dir=mine, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: --run-dir: {mine} is not empty (config.yaml)")
    assert proc.stderr.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["config.yaml"]
    assert (mine / "config.yaml").read_text() == "my: own\n"
