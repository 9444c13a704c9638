"""Session-wide test set-up, loaded before any test module is imported.

Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton decides that when
it is first imported and when kernels are decorated, and other test modules' imports
(transformers, peft, torch's compiler stack) may import Triton early, so the choice is made
here, first.

Session-wide fixtures shared by test packages: short real runs with monitoring on, read by the
monitoring tests (tests/train/monitoring) and the report tests (tests/report).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lptrain.testing import runs  # noqa: E402  (after the Triton choice)

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
