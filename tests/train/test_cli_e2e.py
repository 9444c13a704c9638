"""`lptrain train` end to end on the tiny recipes: outputs, contents, and a falling loss."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import metrics, train_losses

HIGH = ["tiny-fp32.yaml", "tiny-bf16.yaml"]
QUANTIZED = ["tiny-fp8.yaml", "tiny-nvfp4.yaml", "tiny-quartet.yaml", "tiny-int16-dfp.yaml"]
STEPS = 12


def _check_run(proc, run_dir, recipe_name: str):
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {run_dir.resolve()}"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["run"]["max_steps"] == STEPS and cfg["model"]["preset"] == "nano"
    assert cfg["run"]["name"] == recipe_name.removesuffix(".yaml")
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["gradient_clipping"] == 1.0 and ds["optimizer"]["params"]["torch_adam"] is True
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    val = [r for r in metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in val] == [6, 12]
    losses = train_losses(run_dir)
    # From ln(320) ~ 5.8 at init, byte-level loss falls by more than 1 nat in 12 steps at lr 1e-2.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000012"


@pytest.mark.parametrize("recipe", HIGH + QUANTIZED)
def test_tiny_recipe_trains(cli, tmp_path, recipe):
    run_dir = tmp_path / "run"
    proc = cli(recipe, f"run.max_steps={STEPS}", "run.eval_interval=6", run_dir=run_dir)
    _check_run(proc, run_dir, recipe)
