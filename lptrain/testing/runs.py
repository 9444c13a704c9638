"""Short `lptrain train` runs in a clean subprocess, for tests (and benchmarks) that need real
run directories: the monitoring tests and the report tests read the same runs.

`NANO` is the smallest configuration whose loss still falls: seconds per run on a CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "pretrain"
NANO = [
    "model.preset=nano",
    "data.block_size=64",
    "optim.lr=1e-2",
    "optim.warmup_steps=2",
    "logging.interval=1",
    "logging.progress=lines",
    "run.eval_interval=0",
    "checkpoint.interval=0",
]
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict:
    """The environment without launcher, W&B and DeepSpeed variables, offline, one thread."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS
        and k != "LOCAL_WORLD_SIZE"
        and not k.startswith(("WANDB_", "DS_"))
    }
    # DeepSpeed JIT-builds a CPU op per extensions dir; keep the user's (or the caller's).
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(n), "--master_port", str(free_port())]  # fmt: skip


def train(
    recipe: str,
    run_dir: Path,
    *overrides: str,
    launcher: list[str] | None = None,
    env: dict | None = None,
    code: str | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """`lptrain train recipes/pretrain/<recipe> --run-dir run_dir` with NANO and `overrides`
    (later ones win). `code`: run this Python source instead of `-m lptrain` (it receives the
    CLI arguments in sys.argv[1:]), e.g. to patch the trainer for fault injection."""
    head = launcher or [sys.executable]
    entry = ["-c", code] if code is not None else ["-m", "lptrain"]
    args = ["train", str(RECIPES / recipe), "--run-dir", str(run_dir)]
    for kv in [*NANO, *overrides]:
        args += ["--set", kv]
    proc = subprocess.run([*head, *entry, *args], cwd=REPO, env=clean_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc
