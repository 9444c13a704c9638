"""Two processes (torchrun, gloo) match one process for the same global batch.

Tolerance: 1e-5 relative per step in fp32. The only difference is the order in which the
gradient all-reduce sums; the research note measured at most 1.8e-7 absolute over 8 steps.

FP8 (delayed scaling, amax MAX-reduced across ranks): the first loss, before any update,
agrees to 1e-5. After that, fp32 summation-order differences of ~1 ulp flip FP8 roundings (a
relative step of 2^-3) and the curves drift: measured 1.4e-4 relative at step 2 and 0.8% by
step 6, hence 2%. This checks the converted 2-rank path end to end; it is too loose to prove
the amax reduction itself (without it, step 2 differed by 3.2e-4 instead of 1.4e-4).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import FAST, REPO, TINY, clean_env, free_port, sets, train_losses

STEPS = 6
REL_TOL = 1e-5
FP8_DRIFT_TOL = 2e-2


# One process gives bitwise the same fp32 losses in ZeRO stages 0-3 (research note, 1.2), so
# the stage-0 single-process curve is the reference for every stage; computed once per recipe.
_REFERENCE: dict[str, list[float]] = {}


def _one_process_losses(cli, tmp_path, recipe: str) -> list[float]:
    if recipe not in _REFERENCE:
        one = tmp_path / "one"
        cli(recipe, f"run.max_steps={STEPS}", "deepspeed.micro_batch=8", run_dir=one)
        _REFERENCE[recipe] = train_losses(one)
    return _REFERENCE[recipe]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,stage",
    [
        ("tiny-fp32.yaml", 2),
        ("tiny-fp32.yaml", 3),
        # Delayed scaling: equal only because amax is MAX-reduced over the two ranks.
        ("tiny-fp8.yaml", 2),
        ("tiny-fp8.yaml", 3),  # quantized layers see gathered weights in both ranks
    ],
)
def test_two_ranks_match_one(cli, tmp_path, recipe, stage):
    common = [
        f"run.max_steps={STEPS}",
        f"deepspeed.zero_stage={stage}",
        # ZeRO-3 keeps small parameters gathered unless told not to; 0 really partitions.
        "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ]
    two = tmp_path / "two"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    proc = cli(
        recipe,
        *common,
        "deepspeed.micro_batch=4",
        "deepspeed.train_batch_size=8",
        run_dir=two,
        launcher=torchrun,
        timeout=300,
    )
    assert proc.stdout.count("run directory:") == 1  # rank 0 only
    a, b = _one_process_losses(cli, tmp_path, recipe), train_losses(two)
    assert len(a) == len(b) == STEPS
    tols = [REL_TOL] * STEPS if recipe == "tiny-fp32.yaml" else [REL_TOL] + [FP8_DRIFT_TOL] * 5
    for x, y, tol in zip(a, b, tols, strict=True):
        assert abs(x - y) <= tol * abs(x), (a, b)
    assert b[-1] < b[0]


@pytest.mark.slow
def test_cpu_multiprocess_launch_script(tmp_path, data_cache):
    """The README's CPU data-parallel command, as written (torchrun from the environment)."""
    run_dir = tmp_path / "run"
    env = clean_env(PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    overrides = [*FAST, f"data.cache_dir={data_cache}", "run.max_steps=3"]
    proc = subprocess.run(
        ["bash", "launch/cpu_multiprocess.sh", "2", str(TINY / "tiny-fp32.yaml")]
        + ["--run-dir", str(run_dir), *sets(*overrides, "deepspeed.zero_stage=2")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(train_losses(run_dir)) == 3
    assert proc.stdout.count("run directory:") == 1


def test_multi_node_env_file_is_private(tmp_path):
    """launch/multi_node.sh ships WANDB_*/HF_* (API keys) in ./.deepspeed_env: owner-only, even
    over an earlier file that others could read."""
    (tmp_path / ".deepspeed_env").write_text("OLD=1\n")
    (tmp_path / ".deepspeed_env").chmod(0o644)
    env = clean_env(LPTRAIN_DRY_RUN="1", WANDB_API_KEY="secret", HF_TOKEN="hf-secret")
    proc = subprocess.run(
        ["bash", str(REPO / "launch/multi_node.sh"), "hostfile", "recipe.yaml", "--run-dir", "r"],
        cwd=tmp_path,
        env={**env, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deepspeed --hostfile hostfile ")
    assert proc.stdout.rstrip().endswith("--module lptrain train recipe.yaml --run-dir r")
    written = tmp_path / ".deepspeed_env"
    assert written.stat().st_mode & 0o777 == 0o600
    assert {"WANDB_API_KEY=secret", "HF_TOKEN=hf-secret"} <= set(written.read_text().split())
    assert "OLD=1" not in written.read_text()
