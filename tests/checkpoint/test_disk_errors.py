"""A save that cannot write (store.disk_errors): one line naming the path and the OS error,
exit 2, every earlier checkpoint intact and `latest` naming one of them. The full-disk run uses
a small tmpfs in a private mount namespace (`unshare -m`, or `unshare -rm` without root)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest

from lptrain.checkpoint import store
from tests.helpers import FAST, REPO, TINY, clean_env, sets

Usage = namedtuple("Usage", "total used free")


def test_a_failed_write_becomes_one_os_error(tmp_path, monkeypatch):
    tmp = tmp_path / "step00000002.tmp"
    tmp.mkdir()
    (tmp / "part").write_bytes(b"x" * 10)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(100, 100, 0))
    with pytest.raises(OSError) as exc, store.disk_errors(tmp):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 1280 vs 1174"
        )
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp)
    assert not tmp.exists()  # the partial save is gone, freeing its space
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError), store.disk_errors(tmp):  # not a disk problem: as it is
        raise RuntimeError("a bug")


def _unshare() -> list[str] | None:
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = [*cmd, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt || exit 1"]
        if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
            return cmd
    return None


def test_disk_full_during_a_save(tmp_path, data_cache):
    cmd = _unshare()
    if cmd is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm) to make a small disk")
    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    train = [sys.executable, "-m", "lptrain", "train", str(TINY / "tiny-fp32.yaml"),
             "--run-dir", str(run),
             *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=3",
                   "checkpoint.interval=1", "checkpoint.keep_last=3")]  # fmt: skip
    # Room for the run's files and two checkpoints of the nano model, not three; the listing
    # is printed from inside the namespace, where the tmpfs is.
    export = f"{sys.executable} -m lptrain export {run} --out {disk}/export --blocks 2"
    script = (f"mount -t tmpfs -o size=2600k tmpfs {disk} && {' '.join(train)}; rc=$?; "
              f"{export}; echo $?; ls {disk}; "
              f"cat {run}/checkpoints/latest; echo; ls {run}/checkpoints; exit $rc")  # fmt: skip
    proc = subprocess.run([*cmd, "sh", "-c", script], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors[0] == (
        f"error: {run}/checkpoints/step00000003.tmp: No space left on device [Errno 28] "
        "(earlier checkpoints are intact)"
    )
    # The export on the full disk: one line too, and no partial export or staging folder left.
    assert len(errors) == 2 and "No space left on device [Errno 28]" in errors[1], errors
    assert "Traceback" not in proc.stderr
    export_rc, disk_listing, latest, *listing = proc.stdout.split()
    assert export_rc == "2" and disk_listing == "run"
    assert latest == "step00000002" and listing == ["latest", "step00000001", "step00000002"]


def test_read_only_run_directory_fails_before_any_work(tmp_path, data_cache):
    """A run directory on a read-only file system (a bind mount made read-only) is refused in
    one line naming it and the OS error, before the model is built."""
    cmd = _unshare()
    if cmd is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm) to mount read-only")
    disk = tmp_path / "ro"
    disk.mkdir()
    train = [sys.executable, "-m", "lptrain", "train", str(TINY / "tiny-fp32.yaml"),
             "--run-dir", str(disk / "run"),
             *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=1")]  # fmt: skip
    script = f"mount --bind {disk} {disk} && mount -o remount,bind,ro {disk} && {' '.join(train)}"
    proc = subprocess.run([*cmd, "sh", "-c", script], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert str(disk / "run") in errors[0] and "Read-only file system" in errors[0]
    assert "model:" not in proc.stderr and "Traceback" not in proc.stderr
