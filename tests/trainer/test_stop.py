"""Signals (trainer/stop.py): start-up stops at once with a message; in the loop a signal saves
and exits 0; a repeat within REPEAT_S is the same request; a later one stops without saving
and leaves the last checkpoint intact. Under torchrun the ranks save and torchrun exits 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lptrain.checkpoint import store
from lptrain.trainer import stop
from tests.helpers import FAST, REPO, TINY, clean_env, free_port, metrics, sets, wait_for_step


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _kill_self(sig=signal.SIGTERM) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs at the next bytecode boundary


def test_signal_rules():
    clock = Clock()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, else Python's
    s = stop.Signals(clock)
    try:
        with pytest.raises(stop.Interrupted) as exc:  # start-up: stop now
            _kill_self()
        assert exc.value.when == "during start-up" and exc.value.signum == signal.SIGTERM
        s.first = None
        with s.deferred():  # ... except inside a critical section, which finishes first
            _kill_self(signal.SIGINT)
            assert s.requested
            s.in_loop = True  # (left as the loop would leave it: no stop on exit)
        s.first = None
        _kill_self()  # in the loop: a request, no exception
        assert s.requested
        clock.t += stop.REPEAT_S / 2
        _kill_self()  # the same request delivered again
        clock.t += stop.REPEAT_S
        with pytest.raises(stop.Interrupted) as exc:  # a second request: stop now
            _kill_self(signal.SIGINT)
        assert exc.value.when == "again" and exc.value.signum == signal.SIGINT
    finally:
        s.close()
    assert signal.getsignal(signal.SIGINT) is before  # the handler found is put back


def test_sigterm_during_start_up_stops_with_one_line(cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("tiny-fp32.yaml", "run.max_steps=4", run_dir=run_dir, faults="term@startup")
    assert proc.stderr.splitlines()[-1] == (
        "stopped: SIGTERM during start-up, before any training step; nothing to save "
        "(the same command starts again)"
    )
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not run_dir.exists()  # nothing was written


def test_a_second_sigterm_stops_without_saving_and_keeps_the_last_checkpoint(cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(
        "tiny-fp32.yaml",
        "run.max_steps=20",
        "checkpoint.interval=2",
        run_dir=run_dir,
        faults="term@3,term@save",
        check=False,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "stopped: a second SIGTERM; exiting without saving (the last complete checkpoint is "
        "intact; the same command resumes from it)"
    )
    assert "Traceback" not in proc.stderr
    assert store.newest_verified(run_dir / "checkpoints")[0].tag == "step00000002"
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_saves_on_every_rank_and_torchrun_exits_1(tmp_path, data_cache):
    """As `scancel` does it: SIGTERM to the whole process group, so each rank gets it twice
    (directly, then forwarded by torchrun); that is one request: both ranks save and exit 0.
    torchrun itself then exits 1 (its SignalException), as documented in the README."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "lptrain", "train",
        str(TINY / "tiny-fp32.yaml"), "--run-dir", str(run_dir),
        *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=100000",
              "deepspeed.zero_stage=1"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    wait_for_step(run_dir, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "SignalException" in err and "stopped: a second" not in err
    found, _ = store.newest_verified(run_dir / "checkpoints")
    assert found is not None and found.manifest["world_size"] == 2
    assert {"lptrain_rank0.pt", "lptrain_rank1.pt"} <= set(found.manifest["files"])
    assert err.count("stopped at step") == 1  # rank 0 speaks for both
