"""Elastic resume (train/elastic.py): a checkpoint saved on N ranks resumes on M ranks through a
DeepSpeed universal checkpoint, converted automatically, with the quantizer state carried over.

Reference: the uninterrupted run that wrote the checkpoint, with the same global batch; after
the resume only the number of ranks differs, so the bounds are those of the two-rank tests
(test_launch.py): 1e-5 relative in fp32; in FP8 the first resumed step to 1e-5 and later steps
to 2% (fp32 summation order flips FP8 roundings; measured 1e-5 here).
"""

from __future__ import annotations

import sys

import pytest
import torch

from .conftest import free_port, train_losses

REL_TOL = 1e-5
FP8_DRIFT_TOL = 2e-2
HISTORY = "layers.0.attn.wq.quant_state.output_input"


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", "2", "--master_port", str(free_port())]  # fmt: skip


def _module(run_dir, tag="step00000004") -> dict:
    path = run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


def _close(a: list[float], b: list[float], tols: list[float]) -> None:
    assert len(a) == len(b) == len(tols), (a, b)
    for x, y, tol in zip(a, b, tols, strict=True):
        assert abs(x - y) <= tol * abs(x), (a, b)


@pytest.mark.slow
def test_fp8_saved_on_two_ranks_resumes_on_one(cli, tmp_path):
    common = ["run.max_steps=4", "checkpoint.interval=2", "deepspeed.zero_stage=2"]
    two = tmp_path / "two"
    cli("tiny-fp8.yaml", *common, "deepspeed.micro_batch=4", "deepspeed.train_batch_size=8",
        run_dir=two, launcher=_torchrun(), timeout=300)  # fmt: skip
    one = tmp_path / "one"
    resume = f"checkpoint.resume={two / 'checkpoints' / 'step00000002'}"
    proc = cli("tiny-fp8.yaml", *common, resume, "deepspeed.micro_batch=8", run_dir=one)
    assert "saved by 2 ranks, this run has 1: resuming through a DeepSpeed universal" in (
        proc.stderr
    )
    assert (two / "checkpoints" / "universal" / "step00000002" / "zero").is_dir()
    _close(train_losses(two)[2:], train_losses(one), [REL_TOL, FP8_DRIFT_TOL])
    # The delayed-scaling history continued: 2 amaxes from before the save + 2 after, as in
    # the uninterrupted run (a reset history would hold 2).
    ref, got = _module(two), _module(one)
    for key in (f"{HISTORY}.amax_history", f"{HISTORY}.calls"):
        assert int((ref[key] != 0).sum()) == int((got[key] != 0).sum()) > 0, key
    assert int(got[f"{HISTORY}.calls"].sum()) == 4


@pytest.mark.slow
def test_fp32_zero3_saved_on_one_rank_resumes_on_two(cli, tmp_path):
    common = [
        "run.max_steps=4",
        "checkpoint.interval=2",
        "deepspeed.zero_stage=3",
        "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ]
    one = tmp_path / "one"
    cli("tiny-fp32.yaml", *common, "deepspeed.micro_batch=8", run_dir=one)
    two = tmp_path / "two"
    resume = f"checkpoint.resume={one / 'checkpoints' / 'step00000002'}"
    cli("tiny-fp32.yaml", *common, resume, "deepspeed.micro_batch=4",
        "deepspeed.train_batch_size=8", run_dir=two, launcher=_torchrun(), timeout=300)  # fmt: skip
    _close(train_losses(one)[2:], train_losses(two), [REL_TOL, REL_TOL])


def test_stage0_checkpoint_on_another_world_size_is_refused(tmp_path):
    from lptrain.train import elastic
    from lptrain.train.checkpoint import Found
    from lptrain.train.config import ConfigError

    found = Found(tmp_path, "step00000002", {"world_size": 1, "zero_stage": 0})
    with pytest.raises(ConfigError, match="universal checkpoint needs ZeRO stage 1-3"):
        elastic.check(found, 2)
    found = Found(tmp_path, "step00000002", {"world_size": 1, "zero_stage": 1})
    assert "converting it once into" in elastic.check(found, 2)
    assert elastic.command(found) == (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {tmp_path}/step00000002 "
        f"--output_folder {tmp_path}/universal/step00000002"
    )
