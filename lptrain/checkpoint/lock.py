"""One writer per run directory: `RUN/lptrain.lock`, held by rank 0 of `lptrain train`.

Two trainers on one run directory remove each other's half-written checkpoints and rewind each
other's metrics, so a second start is refused at once, before anything heavy, with one line that
names the holder: `error: --run-dir: RUN is in use by pid N on HOST since TIME`.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `RUN/lptrain.lock`, taken by rank 0 (every rank
gets its verdict) and kept until the process exits. The kernel drops a flock when its process
ends, however it ends (SIGKILL included), so the file a dead run leaves behind never blocks:
only a live holder does. The file's text (pid, host, start time) is only for the message; a
start that is refused reads it and writes nothing.

Taking the lock is also the first write into the run directory, so a directory that cannot be
created or written (read-only filesystem, no permission) fails here in one line too.

Limits: flock is as good as the filesystem's locking. On NFS, Linux sends flock to the server
as a whole-file POSIX lock (cross-node) unless the mount says `local_lock=flock|all` or `nolock`
(then it is per node); on Lustre it is cross-node only with the `flock` mount option
(`localflock`: per node; neither: flock fails, and lptrain says so and goes on unlocked). So
two jobs whose rank 0 runs on different nodes may both get the lock: `launch/slurm.sbatch`
gives every job its own run directory (`runs/<recipe>-<job id>`) for that reason.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from lptrain.checkpoint import manifest, rundir
from lptrain.errors import ConfigError

NAME = rundir.LOCK  # "lptrain.lock"
# flock is not available on this filesystem (e.g. Lustre without `flock`/`localflock`).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass
class RunLock:
    """The lock on `run_dir`; `fd` is None when the filesystem has no flock."""

    run_dir: Path
    fd: int | None
    created: bool = False  # `run_dir` did not exist before this lock made it

    def release(self, abandon: bool = False) -> None:
        """Let go before the process ends (a process that exits needs no call). `abandon`: the
        start failed before writing anything, so a lock file that is the directory's only
        content goes, and the directory too if this lock made it: nothing was written."""
        if self.fd is None:
            return
        if abandon and [p.name for p in self.run_dir.iterdir()] == [NAME]:
            (self.run_dir / NAME).unlink()  # while held: no other start can have it
            if self.created:
                self.run_dir.rmdir()
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None


def holder_text() -> str:
    """What the lock file says about this process: the tail of the refusal's message."""
    since = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}"


def acquire(run_dir: Path, say=None) -> RunLock:
    """Create `run_dir` if needed and lock it for this process, or raise ConfigError
    (`--run-dir`): in use by a live process, or not creatable / writable."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a start that is refused must leave the holder's text as it is.
        fd = os.open(run_dir / NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError("--run-dir", f"{run_dir} cannot be written: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd) or "another process (starting up)"
        os.close(fd)
        raise ConfigError(
            "--run-dir",
            f"{run_dir} is in use by {holder} ({run_dir / NAME}); wait for that run to end, or "
            "use another --run-dir",
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            os.close(fd)
            raise ConfigError("--run-dir", f"{run_dir} cannot be locked: {exc}") from None
        if say is not None:
            say(f"run directory: not locked (this filesystem has no flock: {exc}); make sure "
                "no other run uses it")  # fmt: skip
        os.close(fd)
        return RunLock(run_dir, None)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_text() + "\n").encode(), 0)
    return RunLock(run_dir, fd, created)


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def take(run_dir: Path, say=None) -> RunLock | None:
    """Collective: rank 0 checks that `run_dir` may be used (rundir.check_target) and locks it,
    before anything is written there; every rank raises rank 0's ConfigError, if any. Returns
    the lock on rank 0 (kept until the process exits), None on the other ranks."""
    held, refused = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            rundir.check_target(run_dir)  # before the lock file is the first thing written
            held = acquire(run_dir, say)
        except ConfigError as exc:
            refused = (exc.path, exc.problem)
    refused = manifest.from_rank0(refused)
    if refused is not None:
        raise ConfigError(*refused)
    return held
