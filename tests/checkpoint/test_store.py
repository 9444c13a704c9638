"""Checkpoints (checkpoint/store.py): resume is exact (N steps straight == N/2, stop, resume,
N/2 more, bit for bit); a checkpoint is trusted only when its manifest verifies, and a corrupt
newest one falls back to the previous; pruning never removes the checkpoint just written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lptrain.checkpoint import store
from lptrain.testing import checkpoints as fake
from lptrain.testing.checkpoints import MODEL, OPTIM
from tests.helpers import metrics, train_losses

N = 8


def _hex(run_dir) -> list[str]:
    return [float(x).hex() for x in train_losses(run_dir)]


@pytest.mark.parametrize(
    "recipe,extra",
    [
        # Dropout on: the torch RNG must come back from the per-rank side file.
        (
            "tiny-fp32.yaml",
            ["model.dropout=0.1", "deepspeed.zero_stage=1", "deepspeed.grad_accum=2"],
        ),
        # Stochastic-rounding generators (side file) under ZeRO-3 with real partitioning.
        (
            "tiny-quartet.yaml",
            [
                "deepspeed.zero_stage=3",
                "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}",
            ],
        ),
        ("tiny-fp8.yaml", ["deepspeed.dtype=bf16"]),  # amax histories (buffers), bf16 engine
    ],
)
def test_resume_is_bitwise_exact(cli, tmp_path, recipe, extra):
    common = [f"run.max_steps={N}", "run.eval_interval=4", *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(recipe, *common, run_dir=straight)
    first = cli(recipe, *common, f"run.stop_at_step={N // 2}", run_dir=split)
    assert "stopped at step 4" in first.stderr
    assert (split / "checkpoints" / "latest").read_text() == "step00000004"
    second = cli(recipe, *common, run_dir=split)
    assert "resumed from" in second.stderr and "at step 4" in second.stderr
    assert _hex(split) == _hex(straight) and len(_hex(split)) == N
    val = lambda d: [r["val_loss"] for r in metrics(d) if "val_loss" in r]  # noqa: E731
    assert val(split) == val(straight)
    # Each save is complete: DeepSpeed's files plus our side file, and no stray .tmp.
    ckpts = sorted(p.name for p in (split / "checkpoints").iterdir() if not p.suffix == ".py")
    assert ckpts == ["latest", "step00000004", "step00000008"]
    assert (split / "checkpoints" / "step00000008" / "lptrain_rank0.pt").is_file()


# ---------------------------------------------------------------- verification (no DeepSpeed)


def _save(ckpt: Path, step: int, keep_last: int = 3) -> Path:
    return fake.save(ckpt, step, keep_last=keep_last)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


S6 = "step00000006"
CORRUPT = {
    # name: (damage to the step-6 checkpoint dir, expected reason for rejecting step 6)
    "truncated model states": (lambda d: _truncate(d / MODEL), f"{MODEL} is 100 bytes"),
    "truncated optimizer states": (lambda d: _truncate(d / OPTIM), f"{OPTIM} is 100 bytes"),
    "same size, one byte flipped": (lambda d: _flip_a_byte(d / OPTIM), "checksum mismatch"),
    "missing side file": (lambda d: (d / "lptrain_rank0.pt").unlink(), "lptrain_rank0.pt missing"),
    "no manifest (cut-short save)": (lambda d: (d / "manifest.json").unlink(), "no manifest"),
    "garbage manifest": (lambda d: (d / "manifest.json").write_text("{"), "unreadable"),
    "latest names a missing tag": (shutil.rmtree, "named by 'latest' but missing"),
}


@pytest.mark.parametrize("damage,reason", CORRUPT.values(), ids=list(CORRUPT))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, reason):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(ckpt, step)
    assert store.newest_verified(ckpt)[0].tag == S6
    damage(ckpt / S6)
    found, rejected = store.newest_verified(ckpt)
    assert found.tag == "step00000004" and found.step == 4
    assert [tag for tag, _ in rejected] == [S6] and reason in rejected[0][1], rejected


def test_latest_is_not_needed_and_nothing_verifying_is_none(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(ckpt, step)
    (ckpt / "latest").unlink()  # deleted by hand: the newest complete tag still wins
    assert store.newest_verified(ckpt)[0].tag == "step00000004"
    (ckpt / "latest").write_text("")
    found, rejected = store.newest_verified(ckpt)
    assert found.tag == "step00000004" and rejected == [("latest", "empty")]
    for step in (2, 4):
        _truncate(ckpt / f"step0000000{step}" / MODEL)
    found, rejected = store.newest_verified(ckpt)
    assert found is None and [t for t, _ in rejected] == ["latest", "step00000004", "step00000002"]


def test_prune_keeps_the_newest_and_never_the_one_just_written(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(ckpt, step, keep_last=2)
    assert store.list_tags(ckpt) == ["step00000004", S6]
    # A save below existing tags (only reachable if they were not moved aside) deletes none of
    # them and is kept itself; `latest` names it.
    _save(ckpt, 1, keep_last=2)
    assert store.list_tags(ckpt) == ["step00000001", "step00000004", S6]
    assert store.read_latest(ckpt) == "step00000001"
    # Re-saving a step replaces it whole: it verifies and `latest` names it.
    _save(ckpt, 6, keep_last=2)
    assert store.verify(ckpt, S6)[0] is not None and store.read_latest(ckpt) == S6
    assert not list(ckpt.glob("*.tmp")) and not list(ckpt.glob("*.deleting"))
    manifest = json.loads((ckpt / S6 / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1 and manifest["zero_stage"] == 1
    assert set(manifest["files"]) == {MODEL, OPTIM, "lptrain_rank0.pt", "config.yaml"}
    assert store.saved_config(store.verify(ckpt, S6)[0]) == "run: {seed: 0}\n"


# ---------------------------------------------------------------- end to end


def test_resume_skips_a_corrupt_checkpoint_and_says_so(cli, tmp_path):
    run_dir = tmp_path / "run"
    common = ["checkpoint.interval=2", "checkpoint.keep_last=2", "run.max_steps=8"]
    cli("tiny-fp32.yaml", *common, "run.stop_at_step=6", run_dir=run_dir)
    _truncate(run_dir / "checkpoints" / S6 / MODEL)
    proc = cli("tiny-fp32.yaml", *common, run_dir=run_dir)
    assert (
        "checkpoint: resuming from step00000004, the newest that verifies (step00000006: "
        f"{MODEL} is 100 bytes" in proc.stderr
    )
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    # One row per step; the rows of steps 5-6 from the first run were moved aside and equal the
    # redone ones bit for bit (exact resume from step 4).
    rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert sorted(rows) == list(range(1, 9))
    lines = (run_dir / "metrics-superseded.jsonl").read_text().splitlines()
    old = [json.loads(line) for line in lines]
    assert [(r["step"], r["superseded_at"]) for r in old if "loss" in r] == [(5, 4), (6, 4)]
    assert all(r["loss"] == rows[r["step"]]["loss"] for r in old if "loss" in r)
    # Nothing verifies: one line, exit 2, nothing written.
    for tag in store.list_tags(run_dir / "checkpoints"):
        (run_dir / "checkpoints" / tag / "manifest.json").unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    proc = cli("tiny-fp32.yaml", *common, "run.max_steps=10", run_dir=run_dir, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: checkpoint.resume: no checkpoint in ")
    assert "--archive" in proc.stderr and (run_dir / "metrics.jsonl").read_text() == before
