"""The loop (trainer/loop.py): non-finite steps are skipped and counted, a run of them reloads
the last good checkpoint, SIGTERM saves and exits cleanly."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import FAST, REPO, TINY, clean_env, metrics, sets, train_losses, wait_for_step

# Poison the training loss (not eval) on chosen forward calls, then run the real CLI.
POISON = textwrap.dedent("""
    import sys, torch
    from lptrain.models import decoder
    bad, calls, forward = set(map(int, sys.argv[1].split(","))), [0], decoder.Decoder.forward
    def poisoned(self, tokens):
        loss = forward(self, tokens)
        if self.training:
            calls[0] += 1
            if calls[0] in bad:
                return loss * float("nan")
        return loss
    decoder.Decoder.forward = poisoned
    from lptrain.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _poisoned_run(tmp_path, data_cache, bad: str, *overrides: str):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        POISON,
        bad,
        "train",
        str(TINY / "tiny-fp32.yaml"),
        "--run-dir",
        str(run_dir),
        *sets(*FAST, f"data.cache_dir={data_cache}", *overrides),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240
    )
    return proc, run_dir


# Stage 0 fp32: lptrain's own check (DeepSpeed has none there). ZeRO fp32 and bf16: DeepSpeed's
# overflow check (`bf16.check_grad_overflow`, written explicitly) skips; lptrain counts.
@pytest.mark.parametrize("dtype,stage", [("fp32", 0), ("fp32", 1), ("bf16", 2)])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, data_cache, dtype, stage):
    proc, run_dir = _poisoned_run(
        tmp_path,
        data_cache,
        "3",
        "run.max_steps=5",
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.dtype={dtype}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert rows[2]["loss"] is None and rows[2]["skipped_steps"] == 1  # NaN is written as null
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    assert rows[-1]["skipped_steps"] == 1
    # The skipped update left the weights finite and training went on.
    assert rows[-1]["loss"] < rows[0]["loss"]
    # DeepSpeed's skip warning (ZeRO and bf16) is in the run's log, not on stdout (liblog.py).
    assert proc.stdout.splitlines()[0].startswith("done: 5 steps")
    assert len(proc.stdout.splitlines()) == 2 and "OVERFLOW" not in proc.stderr
    if stage > 0:
        assert "OVERFLOW! " in (run_dir / "logs" / "rank0.log").read_text()


def test_a_run_of_nonfinite_steps_reloads_the_last_checkpoint(tmp_path, data_cache):
    proc, run_dir = _poisoned_run(
        tmp_path,
        data_cache,
        "5,6",
        "run.max_steps=6",
        "checkpoint.interval=2",
        "run.nonfinite_limit=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite: reloaded step00000004" in proc.stderr
    # Steps 5-6 redone from the step-4 checkpoint: one row per step in metrics.jsonl, the
    # replaced rows kept in metrics-superseded.jsonl.
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(run_dir) if "loss" in r][-1] is not None
    old = [json.loads(x) for x in (run_dir / "metrics-superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["superseded_at"]) for r in old] == [(5, None, 4), (6, None, 4)]


def test_nonfinite_without_checkpoint_is_an_error(tmp_path, data_cache):
    proc, _ = _poisoned_run(tmp_path, data_cache, "1,2", "run.max_steps=4", "run.nonfinite_limit=2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 2 consecutive non-finite steps at step 2 and no checkpoint to reload"
    )


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lptrain",
        "train",
        str(TINY / "tiny-fp32.yaml"),
        "--run-dir",
        str(run_dir),
        *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=100000"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in err and "run directory:" in out
    tag = (run_dir / "checkpoints" / "latest").read_text()
    last = [r["step"] for r in metrics(run_dir) if "loss" in r][-1]
    assert tag == f"step{last:08d}"
    assert out.startswith(f"stopped on SIGTERM at step {last} of 100000, ")  # not "done"
    assert "resumable: the same command continues from its checkpoint" in out
    assert (run_dir / "checkpoints" / tag / "lptrain_rank0.pt").is_file()


def test_evaluation_does_not_change_training(cli, tmp_path):
    """Evaluation runs the model in eval mode: delayed-scaling state is used, never updated, so
    the training losses are bit for bit the same with and without it (issue 9)."""
    runs = {}
    for interval in (0, 2):
        run_dir = tmp_path / f"eval{interval}"
        cli("tiny-fp8.yaml", "run.max_steps=6", f"run.eval_interval={interval}", run_dir=run_dir)
        runs[interval] = [float(x).hex() for x in train_losses(run_dir)]
    assert runs[0] == runs[2] and len(runs[0]) == 6
