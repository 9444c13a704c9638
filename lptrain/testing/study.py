"""The training setups of the loss study, shared by `benchmarks/loss_study.py` (which
measures them) and `tests/trainer/test_loop_loss.py` (whose bounds come from those
measurements), so that a test and the numbers behind its bounds cannot drift apart.

Each is `--set` overrides of `recipes/pretrain/tiny-fp32.yaml` (the main job's data,
optimizer, learning rate 3e-3, batch of 16 x 128 tokens, fp32) on a smaller model (nano;
STUDY8: tiny at 4 layers) with a longer warmup than the main job's 20 steps: a recipe's paired
gap to fp32 (same seed: same initial weights, same batches) then repeats from seed to seed
instead of being seed-sized noise (BENCHMARKS.md, "Loss study", which also re-measures the
main job itself).
"""

from __future__ import annotations

import json
import math

BASE_RECIPE = "recipes/pretrain/tiny-fp32.yaml"

# The study: the nano model (2 layers, dim 64) for 300 steps (614k tokens), evaluated every 30
# steps on 16 held-out batches (32k tokens). nano, not tiny: an FP4 recipe emulated on a CPU
# costs ~10x fp32 per token, and every recipe x 3 seeds at tiny x 300 steps is ~3 hours.
STUDY = (
    "model.preset=nano",
    "optim.lr=3e-3",
    "optim.warmup_steps=100",
    "run.max_steps=300",
    "run.eval_interval=30",
    "run.eval_batches=16",
)

# The study at 8x: the seed papers' claims re-run where their effects have more room to show
# (issue 27). The tiny preset at 4 layers (dim 128, ffn 384): 851,968 non-embedding weights,
# 10.4x nano's 81,920. 120 steps of 8 x 256 tokens (246k tokens per run), evaluated every 30
# steps on 12 held-out batches (24.6k tokens). Few tokens for its size: an FP4 recipe emulated
# on a loaded 2-core CPU costs ~7 s per step of 16 x 256 tokens (fp32: ~1.1 s), and the claims
# need about 40 runs in an hour (BENCHMARKS.md, "Loss study at 8x").
STUDY8 = (
    "model.preset=tiny",
    "model.n_layers=4",
    "data.block_size=256",
    "deepspeed.micro_batch=8",
    "optim.lr=3e-3",
    "optim.warmup_steps=40",
    "run.max_steps=120",
    "run.eval_interval=30",
    "run.eval_batches=12",
)

# The CI test: 150 steps of 8 x 128 tokens (154k tokens; mxfp4, the slowest recipe it runs,
# takes ~18 s), evaluated once at the end on 16 batches (16k tokens), at half the study's
# learning rate. Both changes from the first CI setup (8 x 64 tokens, lr 3e-3) keep a recipe's
# paired gap to fp32 from being trajectory noise: there a last-bit difference sent a run onto
# another trajectory, and FP8's paired gaps (up to 0.028 nats) were as wide as nvfp4's cost;
# here FP8 stays within 0.0023 and nvfp4 costs 0.0039 or more at every seed, mxfp4 0.0135
# (the test's FP4 recipe: nvfp4's margin did not survive other GEMM kernels; BENCHMARKS.md,
# "The CI test's setup").
CI = (
    "model.preset=nano",
    "data.block_size=128",
    "deepspeed.micro_batch=8",
    "optim.lr=1.5e-3",
    "optim.warmup_steps=75",
    "run.max_steps=150",
    "run.eval_interval=150",
    "run.eval_batches=16",
)

# No checkpoints, no W&B, plain log lines: a study run leaves only its metrics.
QUIET = (
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
    "checkpoint.resume=none",
    "logging.interval=10",
    "logging.progress=lines",
    "logging.wandb.mode=disabled",
)


def recipe_overrides(recipe: str | dict) -> list[str]:
    """The `--set` overrides selecting a precision recipe (a name or an inline mapping).

    bf16 converts no layer: it is DeepSpeed's bf16 dtype (the config refuses it without)."""
    if recipe == "bf16":
        return ["precision.recipe=bf16", "deepspeed.dtype=bf16"]
    text = recipe if isinstance(recipe, str) else json.dumps(recipe)  # JSON is YAML
    return [f"precision.recipe={text}"]


def val_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, val_loss) of a run's metrics.jsonl rows, in order."""
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def final_val_loss(rows: list[dict]) -> float:
    """The last evaluation's loss (NaN when the run never evaluated)."""
    curve = val_curve(rows)
    return curve[-1][1] if curve else math.nan
