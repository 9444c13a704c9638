"""benchmarks/gpu.sh, the first thing run on a lent GPU: on a machine without one it stops at
once with one line, exit 2, and writes no tables; an unknown argument is refused the same way."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.helpers import REPO, clean_env


def test_gpu_sh_without_a_gpu_is_one_line_exit_2():
    env = clean_env(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    before = set((REPO / "benchmarks" / "out").glob("gpu-quick-*"))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [
        f"error: {sys.executable}: no CUDA device visible to torch {torch.__version__} "
        "(these benchmarks measure GPU kernels)"
    ]
    assert set((REPO / "benchmarks" / "out").glob("gpu-quick-*")) == before


def test_gpu_sh_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quik"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        2, "error: unknown argument '--quik' (usage: benchmarks/gpu.sh [--quick])\n"
    )  # fmt: skip
