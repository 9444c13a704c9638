"""Session-wide test set-up, loaded before any test module is imported.

Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton decides that when
it is first imported and when kernels are decorated, and other test modules' imports
(transformers, peft, torch's compiler stack) may import Triton early, so the choice is made
here, first.

Session-wide fixtures shared by test packages: short real runs with monitoring on, read by the
monitoring tests (tests/observe) and the report tests (tests/report).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lptrain.testing import runs  # noqa: E402  (after the Triton choice)
from tests.helpers import FAST, REPO, TINY, clean_env, lptrain, sets  # noqa: E402

# MXFP8 quantizes along each GEMM's reduction axis in 32-blocks of one token row or one token
# column, so micro-batches and ranks split the same blocks: one process x 16 sequences and two
# x 2 micro-batches x 4 sequences must give the same per-layer statistics (test_layers.py).
COMMON = [
    "precision.recipe=mxfp8",
    "run.max_steps=4",
    "run.eval_interval=2",
]
MONITORED = [
    *COMMON,
    "monitor.interval=1",
    # MXFP6's shadow: E8M0 32-blocks and round-to-nearest like MXFP8, so the ranks' split leaves
    # its statistics as unchanged as the live ones (test_layers.py).
    "monitor.shadow=[mxfp6]",
    "monitor.fidelity=true",
    "precision.guard.enabled=true",
    "precision.guard.interval=1",
]
RUNS = {
    # name: (overrides, processes)
    "monitored": ([*MONITORED, "deepspeed.micro_batch=16", "logging.wandb.mode=offline"], 1),
    "plain": ([*COMMON, "deepspeed.micro_batch=16", "monitor.interval=0"], 1),
    "two_ranks": (
        [*MONITORED, "deepspeed.micro_batch=4", "deepspeed.grad_accum=2", "deepspeed.zero_stage=2"],
        2,
    ),
}


class MonitoredRuns:
    """Run directories by name (see RUNS), each trained on first use, once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "data-cache"
        self.stderr: dict[str, str] = {}

    def __getitem__(self, name: str) -> Path:
        run_dir = self.root / name
        if not (run_dir / "metrics.jsonl").exists():
            overrides, procs = RUNS[name]
            proc = runs.train(
                "tiny-fp32.yaml",
                run_dir,
                *overrides,
                f"data.cache_dir={self.cache}",
                launcher=runs.torchrun(procs) if procs > 1 else None,
                env={"HOME": str(self.root), "WANDB_SILENT": "true"},
            )
            self.stderr[name] = proc.stderr
        return run_dir


@pytest.fixture(scope="session")
def monitored_runs(tmp_path_factory) -> MonitoredRuns:
    return MonitoredRuns(tmp_path_factory.mktemp("monitored-runs"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized embedded corpus for the whole session."""
    return tmp_path_factory.mktemp("lptrain-cache")


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
