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


def test_offline_wandb_holds_the_layer_metrics_and_the_config(monitored_runs):
    """Read back with wandb's own record definitions: every per-layer metric of layers.jsonl
    and every step metric of metrics.jsonl is in the W&B history at its step, and the run's
    config is the resolved recipe."""
    import json

    from lptrain.testing.wandb_file import read_wandb_file

    run_dir = monitored_runs["monitored"]
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    wb = read_wandb_file(path)
    by_step: dict[int, dict] = {}
    for row in wb.history:
        by_step.setdefault(row["_step"], {}).update(row)
    files = [run_dir / "metrics.jsonl", run_dir / "layers.jsonl"]
    checked = 0
    for row in (json.loads(x) for f in files for x in f.read_text().splitlines()):
        logged = by_step[row["step"]]
        for key, value in row.items():
            if key != "step":
                assert logged[key] == value, key  # null stays null: non-finite values
                checked += 1
    assert checked > 4 * 700
    assert "quant/layers.1.mlp.w2/grad_weight.grad_output/sqnr_db" in by_step[4]
    assert wb.config["precision"]["recipe"] == "mxfp8"
    assert wb.config["precision_resolved"]["name"] == "mxfp8"
    assert wb.config["monitor"]["interval"] == 1 and wb.config["precision"]["guard"]["enabled"]


def test_wandb_disabled_run_dir_still_has_everything(monitored_runs):
    """The two-rank run logs to W&B `disabled`: nothing is written for W&B, and its run
    directory holds the same metrics as the offline run's."""
    import json

    two, one = monitored_runs["two_ranks"], monitored_runs["monitored"]
    assert not (two / "wandb").exists()
    for name in ("metrics.jsonl", "layers.jsonl"):
        keys = [{k for x in (d / name).read_text().splitlines() for k in json.loads(x)}
                for d in (one, two)]  # fmt: skip
        assert keys[0] == keys[1] and len(keys[0]) > 10, name
