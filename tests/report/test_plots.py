"""`lptrain report` on two short runs (report/__init__.py, plots.py): the files and what each
figure shows."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

import lptrain.report as lpreport
from lptrain.report import plots, read_runs

from .synthetic import write_run

PLAIN, MON = "tiny-fp32 (plain)", "tiny-fp32 (monitored)"

# `report`: tests/report/conftest.py


def test_writes_the_pngs_the_page_and_the_manifest(report):
    out, _ = report
    manifest = json.loads((out / "report.json").read_text())
    stats = ("sqnr", "saturation", "underflow", "clamped", "amax", "dynamic-range", "scales",
             "weights")  # fmt: skip
    stats += ("shadow-mxfp6-sqnr", "shadow-mxfp6-underflow")  # monitor.shadow: [mxfp6]
    pngs = ["loss.png", "gap.png", *(f"{s}-tiny-fp32-monitored.png" for s in stats)]
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
    # The MXFP6 shadow's SQNR: the same layers and operands, on one colour scale with the
    # run's own (E3M2 gradients sit ~5 dB below MXFP8's E4M3: a colour difference, not a rescale)
    limits = plots.color_limits([run], "sqnr_db")
    shadow = plots.heatmap_figure(run, "sqnr_db", "SQNR (dB)", "viridis", limits=limits,
                                  source="shadow/mxfp6")  # fmt: skip
    assert shadow._suptitle.get_text().startswith(f"{MON}, mxfp6 shadow: SQNR")
    mesh = shadow.axes[2].collections[0]  # grad_input.grad_output
    assert mesh.get_array().shape == (14, 4) and mesh.norm.vmin == limits[0]
    live = fig.axes[2].collections[0].get_array()
    assert (mesh.get_array() < live).all()
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


def _layer_rows(steps, sqnr, layers=("a", "b")):
    """Layer rows: SQNR `sqnr(step, layer index)` of output.input, and weight statistics."""
    rows = []
    for s in steps:
        row = {"step": s}
        for k, name in enumerate(layers):
            row[f"quant/{name}/output.input/sqnr_db"] = sqnr(s, k)
            row[f"quant/{name}/output.input/underflow"] = 0.01 * k
            row[f"quant/{name}/output.input/scale"] = 2.0**-k
            row[f"grad/{name}/norm"] = s + k
            row[f"grad/{name}/cosine"] = 0.9
        rows.append(row)
    return rows


@pytest.fixture
def layered(tmp_path):
    """Two runs logging layer rows at steps 100, 200, 300: SQNR 10-11 dB and 30-31 dB."""
    a = write_run(tmp_path / "a", "a", 300, 300, lambda s: 2.0,
                  layers=_layer_rows((100, 200, 300), lambda s, k: 10 + k))  # fmt: skip
    b = write_run(tmp_path / "b", "b", 300, 300, lambda s: 2.0,
                  layers=_layer_rows((100, 200, 300), lambda s, k: 30 + k))  # fmt: skip
    return read_runs([str(a), str(b)])


def test_heatmaps_share_one_colour_scale_per_statistic_and_show_true_steps(layered):
    figs = {f.file: f.fig for f in lpreport._figures(layered)}
    for run in ("a", "b"):
        mesh = figs[f"sqnr-{run}.png"].axes[0].collections[0]
        assert mesh.get_clim() == (10.0, 31.0)  # both runs' range, in both heatmaps
        ax = figs[f"sqnr-{run}.png"].axes[0]
        assert list(ax.get_xticks()) == [100, 200, 300]  # cells are centred on logged steps
        assert [t.get_text() for t in ax.get_xticklabels()] == ["100", "200", "300"]
    under = figs["underflow-a.png"].axes[0].collections[0].get_array()
    assert under.tolist() == [[0.0] * 3, [1.0] * 3]  # percent, layer a then b
    for f in figs.values():
        plt.close(f)


def test_gradient_statistics_are_plotted(layered):
    fig = plots.weights_figure(layered[0])
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles == [
        "gradient norm",
        "gradient fidelity: cosine to the high-precision gradient",
    ]  # only what was recorded: no update ratio, no alignment
    norm = fig.axes[0].get_lines()
    assert [line.get_label() for line in norm] == ["a", "b"]
    assert norm[1].get_xydata().tolist() == [[100, 101], [200, 201], [300, 301]]
    plt.close(fig)


def test_the_page_explains_the_scale_and_folds_the_extra_statistics(layered, tmp_path):
    page = lpreport.build([str(r.path) for r in layered], tmp_path / "out").read_text()
    assert f"{plots.DEC}.</figcaption>" in page  # under the scale traces, whose axis says dec
    assert page.count("<details>") == 2  # per run: underflow heatmap and gradients folded
    assert page.count("<figcaption>") == page.count('<img src="data:image/png;base64,')


def test_the_gap_plot_never_compares_validation_with_training_loss(tmp_path):
    ref = write_run(tmp_path / "ref", "ref", 20, 20, lambda s: 2.0, val={10: 3.0, 20: 3.0})
    other = write_run(tmp_path / "other", "other", 30, 30, lambda s: 2.2)  # no evaluation
    fig = plots.gap_figure(read_runs([str(ref), str(other)]))
    (line,) = [
        ln for ln in fig.axes[0].get_lines() if ln.get_label() == "other (train, trailing mean)"
    ]
    x, y = line.get_xydata().T
    assert x.max() == 20 * 100  # only the tokens both runs reached
    assert y == pytest.approx([10.0] * 20)  # 2.2 against 2.0 (not against validation's 3.0)
    plt.close(fig)
