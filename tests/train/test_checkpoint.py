"""Resume exactness: N steps straight == N/2, stop, resume, N/2 more; bit for bit."""

from __future__ import annotations

import pytest

from .conftest import metrics, train_losses

N = 8


def _hex(run_dir) -> list[str]:
    return [float(x).hex() for x in train_losses(run_dir)]


@pytest.mark.parametrize(
    "recipe,extra",
    [
        # Dropout on: the torch RNG must come back from the per-rank side file.
        (
            "tiny-fp32.yaml",
            ["model.dropout=0.1", "deepspeed.zero_stage=1", "deepspeed.grad_accum=2"],
        ),
        # Stochastic-rounding generators (side file) under ZeRO-3 with real partitioning.
        (
            "tiny-quartet.yaml",
            [
                "deepspeed.zero_stage=3",
                "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}",
            ],
        ),
        ("tiny-fp8.yaml", ["deepspeed.dtype=bf16"]),  # amax histories (buffers), bf16 engine
    ],
)
def test_resume_is_bitwise_exact(cli, tmp_path, recipe, extra):
    common = [f"run.max_steps={N}", "run.eval_interval=4", *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli(recipe, *common, run_dir=straight)
    first = cli(recipe, *common, f"run.stop_at_step={N // 2}", run_dir=split)
    assert "stopped at step 4" in first.stderr
    assert (split / "checkpoints" / "latest").read_text() == "step00000004"
    second = cli(recipe, *common, run_dir=split)
    assert "resumed from" in second.stderr and "at step 4" in second.stderr
    assert _hex(split) == _hex(straight) and len(_hex(split)) == N
    val = lambda d: [r["val_loss"] for r in metrics(d) if "val_loss" in r]  # noqa: E731
    assert val(split) == val(straight)
    # Each save is complete: DeepSpeed's files plus our side file, and no stray .tmp.
    ckpts = sorted(p.name for p in (split / "checkpoints").iterdir() if not p.suffix == ".py")
    assert ckpts == ["latest", "step00000004", "step00000008"]
    assert (split / "checkpoints" / "step00000008" / "lptrain_rank0.pt").is_file()
