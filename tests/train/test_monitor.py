"""Run logging (train/monitor.py): W&B offline, disabled, auto without credentials."""

from __future__ import annotations


def test_wandb_auto_without_credentials_goes_offline(cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(
        "tiny-fp32.yaml",
        "run.max_steps=2",
        "logging.wandb.mode=auto",
        run_dir=run_dir,
        env_extra={"HOME": str(tmp_path), "WANDB_SILENT": "true"},
    )
    assert "wandb: no credentials found, logging offline" in proc.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_wandb_disabled_writes_nothing(cli, tmp_path):
    run_dir = tmp_path / "run"
    cli("tiny-fp32.yaml", "run.max_steps=1", "logging.wandb.mode=disabled", run_dir=run_dir)
    assert not (run_dir / "wandb").exists()
