"""benchmarks/gpu.sh, the first thing run on a lent GPU: on a machine without one it stops at
once with one line, exit 2, and writes no tables; an unknown argument is refused the same way.
benchmarks/finetune_study.py: the commands it pairs and the verdict it draws (no training).
benchmarks/compare_revisions.py: a recipe it cannot run is refused before any checkout."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from lptrain.config import schema
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


@pytest.mark.parametrize(
    "args,says",
    [
        (["--recipes", "nvfp5"], "--recipes: unknown recipe(s) ['nvfp5']"),
        (["--recipes", "nvfp4", "--train", "fp9"], "--train: no recipes/pretrain/tiny-<name>.yaml"),
    ],
)
def test_compare_revisions_refuses_an_unknown_recipe(args, says):
    script = REPO / "benchmarks" / "compare_revisions.py"
    proc = subprocess.run([sys.executable, str(script), "HEAD", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and says in proc.stderr.splitlines()[-1], proc.stderr


def _finetune_study():
    """benchmarks/finetune_study.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "finetune_study", REPO / "benchmarks" / "finetune_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves the annotations through it
    spec.loader.exec_module(module)
    return module


def _overrides(args: tuple[str, ...]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_finetune_study_pairs_differ_only_in_the_recipe(tmp_path):
    """L4Q and QLoRA at one seed: the same base, seed, steps and validation split, so their
    difference is the method's; each recipe's overrides are valid keys; the eval reads the
    export; a new base invalidates every cached fine-tune; --set makes a run of its own."""
    fs = _finetune_study()
    base = fs.base_run(tmp_path, 400, "cache")
    l4q, qlora = (fs.finetune_run(base, tmp_path, r, 1, 150, "cache") for r in (fs.L4Q, fs.QLORA))
    assert _overrides(l4q.train) == _overrides(qlora.train)
    assert l4q.train[1] == "recipes/finetune/l4q-4bit.yaml"
    assert qlora.train[1] == "recipes/finetune/qlora-int4.yaml"
    assert f"init.from={tmp_path / 'runs' / 'base'}" in _overrides(l4q.train)
    assert base.train[3] == str(tmp_path / "runs" / "base")
    assert l4q.measure == (
        ("export", str(tmp_path / "runs" / "l4q-4bit-150steps-s1")),
        ("eval", str(tmp_path / "runs" / "l4q-4bit-150steps-s1" / "export"), "--json"),
    )
    for run in (base, l4q):
        cfg = schema.load(REPO / run.train[1], _overrides(run.train))
        assert (cfg.model.preset, cfg.model.n_layers, cfg.run.max_steps) == (
            "tiny", 4, 400 if run is base else 150
        )  # fmt: skip
    # The fine-tune evaluates the whole validation split (72 blocks <= 8 x 16) once, at the end.
    assert (cfg.run.eval_batches * cfg.deepspeed.micro_batch, cfg.run.eval_interval) == (128, 150)
    other_base = fs.base_run(tmp_path, 500, "cache")
    assert fs.finetune_run(other_base, tmp_path, fs.L4Q, 1, 150, "cache").key != l4q.key
    # Another setting is another run, beside this one: its overrides come last, so they win.
    lr = fs.finetune_run(base, tmp_path, fs.L4Q, 1, 150, "cache", ("optim.lr=1e-3",))
    assert lr.name == "l4q-4bit-150steps-optim.lr=1e-3-s1"
    assert schema.load(REPO / lr.train[1], _overrides(lr.train)).optim.lr == 1e-3


def test_finetune_study_verdict_names_the_claim():
    """Deployed L4Q minus QLoRA+PTQ per seed: one sign and |mean| > 2 standard errors."""
    fs = _finetune_study()
    assert fs.outcome([-0.010, -0.012, -0.011]) == "reproduced"
    assert fs.outcome([0.010, 0.012, 0.011]) == "contradicted"
    assert fs.outcome([-0.010, 0.012, -0.011]) == "unresolved (not resolved)"
    # One sign but a mean within two standard errors: sd 0.0566, se 0.0327, mean 0.0357.
    assert fs.outcome([0.001, 0.005, 0.101]) == "unresolved (not resolved)"
    l4q = {s: {"loss": v} for s, v in enumerate([1.70, 1.75, 1.80])}
    qlora = {s: {"loss": v} for s, v in enumerate([1.72, 1.74, 1.83])}
    assert fs.paired(l4q, qlora, "loss") == pytest.approx([-0.02, 0.01, -0.03])
