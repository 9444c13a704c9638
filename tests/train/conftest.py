"""Helpers for the trainer tests: run the CLI in a clean subprocess and read its outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "pretrain"
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))  # every shipped recipe file
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

# A nano model for a few steps: seconds per run, and the loss still falls clearly.
FAST = [
    "model.preset=nano",
    "data.block_size=64",
    "deepspeed.micro_batch=8",
    "optim.lr=1e-2",
    "optim.warmup_steps=2",
    "logging.interval=1",
    "run.eval_interval=0",
    "checkpoint.interval=0",
    "logging.progress=lines",
]


def sets(*assignments: str) -> list[str]:
    return [a for kv in assignments for a in ("--set", kv)]


# An op DeepSpeed JIT-builds is built once per extensions dir: keep the user's.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def clean_env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DIST_VARS and not k.startswith(("WANDB_", "DS_"))
    }
    env.update(
        TORCH_EXTENSIONS_DIR=EXTENSIONS,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized embedded corpus for the whole session."""
    return tmp_path_factory.mktemp("lptrain-cache")


def lptrain(*args, launcher=(), check=True, timeout=240) -> subprocess.CompletedProcess:
    """`python -m lptrain ARGS` (or under `launcher`) in a clean environment."""
    cmd = [*(launcher or [sys.executable]), "-m", "lptrain", *map(str, args)]
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory, data_cache) -> Path:
    """A nano fp32 run of 4 steps, the `init.from` base of the fine-tuning and bit-switching
    tests (read only). Pretrained on the fine-tuning corpus itself: tokenizing it takes a
    second (the stdlib corpus a minute), and those tests check mechanics, not domain shift."""
    base = tmp_path_factory.mktemp("pretrained") / "base"
    lptrain("train", TINY / "tiny-fp32.yaml", "--run-dir", base,
            *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=4",
                  "data.path=embedded:pydoc-topics"))  # fmt: skip
    return base


@pytest.fixture
def cli(tmp_path, data_cache):
    """cli(recipe, *overrides, run_dir=..., launcher=[...], flags=[...], faults=SPEC)
    -> CompletedProcess. `faults` runs through lptrain.testing.faults (kills, signals)."""

    def run(
        recipe: str,
        *overrides: str,
        run_dir: Path | None = None,
        launcher=(),
        env_extra: dict | None = None,
        timeout: int = 240,
        check: bool = True,
        flags=(),
        faults: str | None = None,
    ):
        run_dir = run_dir or tmp_path / "run"
        cmd = [*launcher] if launcher else [sys.executable]
        cmd += ["-m", "lptrain.testing.faults", faults] if faults else ["-m", "lptrain"]
        cmd += [
            "train",
            str(TINY / recipe),
            "--run-dir",
            str(run_dir),
            *flags,
            *sets(*FAST, f"data.cache_dir={data_cache}", *overrides),
        ]
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=clean_env(**(env_extra or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
        return proc

    return run


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]
