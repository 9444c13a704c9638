"""The recipes that should train like fp32 do, on the real corpus, through the real CLI.

What a numerics regression costs is validation loss, so this trains the nano model on the
embedded corpus (lptrain/testing/study.py `CI`: 150 steps of 8 x 64 tokens, warmup 75) with
fp32 and each guarded recipe at seed 0, and compares each recipe's final validation loss with
fp32's at the same seed (same initial weights, same batches). In this setup that paired gap
measures the recipe's numerics, not luck: INT16 DFP lands within 1e-4 of fp32 at every seed,
while fp32's own seeds spread with a standard deviation of 0.046.

`python benchmarks/loss_study.py --suite ci` ran the setup at seeds 0-4 (BENCHMARKS.md, "The
CI test's setup"); the bounds below are in units of that fp32 seed sd (FP32_SD):

| recipe | paired gap, seed 0 | largest abs gap, seeds 0-4 | bound |
| --- | ---: | ---: | ---: |
| int16-dfp | +0.00 sd | 0.01 sd | 0.1 sd |
| bf16 | -0.03 sd | 0.48 sd | 0.6 sd |
| fp8-delayed | +0.16 sd | 0.48 sd | 1.0 sd |
| fp8-current | -0.19 sd | 0.60 sd | 1.0 sd |

The margin: each bound is at least the largest gap over five seeds (not just seed 0's) plus
15%, so a change of CPU or BLAS that moves last bits, and with them which seed's trajectory the
run follows, stays inside; INT16's bound is 30x its largest gap because its error (1e-4
relative) is too small to move the trajectory at all. A real regression costs far more: INT32
wrap-around instead of overflow handling (the bug behind the issue's INT16 gap) costs 13-24 sd.
What the FP8 bound cannot catch: nvfp4 itself costs only +0.89 sd at seed 0 (-0.3 to +0.9 sd
over the five seeds), so an FP8 recipe that drifted to FP4-level noise could pass.
"""

from __future__ import annotations

from pathlib import Path

from lptrain.testing.study import BASE_RECIPE, CI, QUIET, final_val_loss, recipe_overrides
from tests.helpers import metrics

SEED = 0
# fp32 at the CI setup (loss_study.py --suite ci): seed 0's final validation loss on the
# machine of BENCHMARKS.md, and the sd over seeds 0-4 (mean 2.488).
FP32_SEED0, FP32_SD = 2.4077, 0.0464
# |recipe - fp32| at seed 0, in units of FP32_SD (see the module docstring).
BOUNDS = {"int16-dfp": 0.1, "bf16": 0.6, "fp8-delayed": 1.0, "fp8-current": 1.0}


def test_recipes_stay_within_fp32_seed_spread(cli, tmp_path):
    def final(recipe: str) -> float:
        run_dir = tmp_path / recipe
        sets = [*QUIET, *CI, *recipe_overrides(recipe), f"run.seed={SEED}"]
        cli(Path(BASE_RECIPE).name, *sets, run_dir=run_dir)
        return final_val_loss(metrics(run_dir))

    fp32 = final("fp32")
    # The bounds hold for the setup they were measured on: a baseline that moved by a seed sd
    # means the setup changed (re-run the ci suite and update the constants) or fp32 regressed.
    assert abs(fp32 - FP32_SEED0) < FP32_SD, (
        f"fp32 seed {SEED} val loss {fp32:.4f}, measured {FP32_SEED0} (sd {FP32_SD}): "
        "the CI setup changed; re-measure with benchmarks/loss_study.py --suite ci"
    )
    gaps = {r: (final(r) - fp32) / FP32_SD for r in BOUNDS}
    table = "\n".join(f"  {r}: {g:+.3f} sd (bound {BOUNDS[r]})" for r, g in gaps.items())
    worse = [r for r, g in gaps.items() if abs(g) > BOUNDS[r]]
    assert not worse, (
        f"fp32 val loss {fp32:.4f}; paired gaps at seed {SEED} in fp32 seed sds ({FP32_SD}):\n"
        f"{table}\noutside their bounds: {worse} (a numerics change that costs loss?)"
    )
