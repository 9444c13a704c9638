"""`lptrain report` on two short runs (report/__init__.py, plots.py): the files and what each
figure shows."""

from __future__ import annotations

import json

import pytest

from lptrain.cli import main
from lptrain.report import plots, read_runs

PLAIN, MON = "tiny-fp32 (plain)", "tiny-fp32 (monitored)"


@pytest.fixture(scope="module")
def report(monitored_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    dirs = [str(monitored_runs["plain"]), str(monitored_runs["monitored"])]
    assert main(["report", *dirs, "--out", str(out)]) == 0
    return out, dirs


def test_writes_the_pngs_the_page_and_the_manifest(report):
    out, _ = report
    manifest = json.loads((out / "report.json").read_text())
    pngs = ["loss.png", "gap.png", "sqnr-tiny-fp32-monitored.png",
            "saturation-tiny-fp32-monitored.png", "scales-tiny-fp32-monitored.png"]  # fmt: skip
    assert sorted(manifest["figures"]) == sorted(pngs)  # no layer rows: no heatmaps for "plain"
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(pngs)
    assert 'src="http' not in page and 'href="http' not in page  # self-contained


def test_each_plot_has_the_expected_series(report):
    out, dirs = report
    figs = json.loads((out / "report.json").read_text())["figures"]
    assert figs["loss.png"]["series"] == [
        f"{PLAIN}: train", f"{PLAIN}: validation", f"{MON}: train", f"{MON}: validation"
    ]  # fmt: skip
    assert figs["gap.png"]["series"] == [f"{PLAIN} (reference)", f"{MON} (validation)"]
    projections = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")
    layers = [f"layers.{i}.{p}" for i in (0, 1) for p in projections]
    assert figs["scales-tiny-fp32-monitored.png"]["series"] == layers  # one line per layer
    run = read_runs(dirs)[1]
    fig = plots.heatmap_figure(run, "sqnr_db", "SQNR (dB)", "viridis")
    panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in panels] == list(plots.OPERANDS)
    grid = panels[0].collections[0].get_array()
    assert grid.shape == (14, 4) and not grid.mask.any()  # 14 layers x 4 steps, all present
    assert [t.get_text() for t in panels[0].get_yticklabels()] == layers
    assert fig.axes[-1].get_ylabel() == "SQNR (dB)"  # the colorbar says what the colour is
    loss = plots.loss_figure(read_runs(dirs))
    assert loss.axes[0].get_xlabel() == "tokens" and "nats/token" in loss.axes[0].get_ylabel()


def test_the_summary_table(report):
    out, _ = report
    plain, mon = json.loads((out / "report.json").read_text())["summary"]
    assert (plain["name"], plain["recipe"], plain["steps"], plain["tokens"]) == (
        PLAIN, "mxfp8", 4, 4 * 16 * 64,
    )  # fmt: skip
    assert mon["gap_pct"] == 0.0  # monitoring changes no loss (test_runner.py)
    assert mon["val_loss"] == plain["val_loss"] and mon["guard"] == [] and mon["skipped"] == 0
