"""One writer per run directory (checkpoint/lock.py): a second start is refused at once and
changes nothing; a killed holder blocks nothing; an unwritable directory fails in one line."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lptrain.checkpoint import lock
from lptrain.errors import ConfigError
from lptrain.testing import runs
from tests.helpers import REPO, clean_env

# Holds the lock on argv[1] until killed; says so on stdout first.
_HOLDER = """
import sys, time
from pathlib import Path
from lptrain.checkpoint import lock
lock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(300)
"""


def _hold(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def _snapshot(run_dir) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}  # fmt: skip


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # no cleanup: the kernel alone releases the lock
    proc.wait(timeout=30)


def _in_use(run_dir, pid: int) -> str:
    return f"{run_dir} is in use by pid {pid} on {socket.gethostname()} since "


def test_a_second_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        text = (run_dir / lock.NAME).read_text()
        assert text.startswith(f"pid {holder.pid} on {socket.gethostname()} since ")
        with pytest.raises(ConfigError) as exc:
            lock.acquire(run_dir)
        assert exc.value.path == "--run-dir"
        assert exc.value.problem.startswith(_in_use(run_dir, holder.pid))
        assert "another --run-dir" in exc.value.problem and "\n" not in exc.value.problem
        assert (run_dir / lock.NAME).read_text() == text  # the refused start wrote nothing
    finally:
        _kill(holder)
    # The file stays behind; without a live holder it blocks nothing.
    held = lock.acquire(run_dir)
    assert (run_dir / lock.NAME).read_text().startswith(f"pid {os.getpid()} on ")
    held.release()


def test_a_directory_that_cannot_be_written_fails_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as exc:
        lock.acquire(tmp_path / "file" / "run")
    assert exc.value.path == "--run-dir"
    assert exc.value.problem.startswith(f"{tmp_path / 'file' / 'run'} cannot be written: ")
    assert "[Errno 20] Not a directory" in exc.value.problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_directory_fails_in_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        for target in (ro, ro / "run"):  # an existing run dir and one to be created in it
            with pytest.raises(ConfigError, match=r"cannot be written: \[Errno 13\] Permission"):
                lock.acquire(target)
    finally:
        ro.chmod(0o755)


def test_a_filesystem_without_flock_goes_on_unlocked_and_says_so(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    said = []
    held = lock.acquire(tmp_path / "run", said.append)
    assert held.fd is None and said[0].startswith("run directory: not locked (")


# ---------------------------------------------------------------- lptrain train


def _train(cli, run_dir, *overrides, check=True, launcher=()):
    return cli("tiny-fp32.yaml", "run.max_steps=2", *overrides, run_dir=run_dir, check=check,
               launcher=launcher)  # fmt: skip


def test_lptrain_train_refuses_a_run_dir_in_use_until_its_holder_dies(cli, tmp_path):
    run_dir = tmp_path / "run"
    _train(cli, run_dir)  # a run directory with a checkpoint and metrics
    holder = _hold(run_dir)
    try:
        held = _snapshot(run_dir)
        start = time.monotonic()
        proc = _train(cli, run_dir, "run.max_steps=4", check=False)
        assert time.monotonic() - start < 60  # refused at start-up, not after the holder ends
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
        assert proc.stderr.startswith("error: --run-dir: " + _in_use(run_dir, holder.pid))
        assert proc.stderr.count("\n") == 1
        assert _snapshot(run_dir) == held  # nothing changed, the lock file included
    finally:
        _kill(holder)
    proc = _train(cli, run_dir, "run.max_steps=4")
    assert "resumed from" in proc.stdout + proc.stderr


def test_lptrain_train_holds_the_lock_while_it_runs(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lptrain", "train", str(REPO / "recipes/pretrain/tiny-fp32.yaml"),
           "--run-dir", str(run_dir), "--set", "model.preset=nano", "--set", "run.max_steps=100000",
           "--set", f"data.cache_dir={data_cache}", "--set", "checkpoint.interval=0"]  # fmt: skip
    trainer = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():  # training: well past start-up
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(ConfigError, match="in use by pid " + str(trainer.pid)):
            lock.acquire(run_dir)
    finally:
        _kill(trainer)
    lock.acquire(run_dir).release()


@pytest.mark.slow
def test_every_rank_is_refused_under_torchrun(cli, tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        proc = _train(cli, run_dir, check=False, launcher=runs.torchrun(2))
        # Both ranks exit 2 with rank 0's verdict (torchrun then fails with its own report).
        assert proc.returncode != 0
        assert proc.stderr.count("error: --run-dir: " + _in_use(run_dir, holder.pid)) == 2
        assert sorted(p.name for p in run_dir.iterdir()) == [lock.NAME]
    finally:
        _kill(holder)
