"""The summary's gaps and run states (report/summary.py) on synthetic run directories: gaps at
the last common step, like with like, and runs still short of their plan marked."""

from __future__ import annotations

import pytest

from lptrain.cli import main
from lptrain.report import read_runs
from lptrain.report.summary import summarize

from .synthetic import write_run


@pytest.fixture
def runs(tmp_path):
    """A 60-step reference, a finished 300-step run and one still at step 10 of 300, all with
    losses falling as 1/step so that final losses differ by run length alone."""
    ref = write_run(tmp_path / "ref", "ref", 60, 60, lambda s: 2.0 + 10 / s,
                    val={20: 3.0, 40: 2.5, 60: 2.4})  # fmt: skip
    long = write_run(tmp_path / "long", "long", 300, 300, lambda s: 2.2 + 11 / s,
                     val={s: 2.2 + 20 / s for s in range(20, 301, 20)})  # fmt: skip
    live = write_run(tmp_path / "live", "live", 10, 300, lambda s: 2.1 + 10 / s)
    return [str(ref), str(long), str(live)]


def test_gaps_are_taken_at_the_last_common_step(runs):
    ref, long, live = summarize(read_runs(runs))
    assert (ref.gap_pct, ref.gap_basis) == (0.0, "reference")
    # validation at step 60, the last both evaluated: 2.2 + 20/60 against 2.4 (not 2.2667 at 300)
    assert long.gap_basis == "validation at step 60"
    assert long.gap_pct == pytest.approx(100 * (2.2 + 20 / 60 - 2.4) / 2.4)  # +5.56%, not -5.56%
    # no evaluation yet: training loss at step 10 on both (the window is one step: 10 > 9)
    assert live.gap_basis == "train (trailing mean) at step 10"
    assert live.gap_pct == pytest.approx(100 * (2.1 + 1 - (2.0 + 1)) / 3.0)  # +3.33%


def test_training_loss_is_compared_over_the_same_step_window(tmp_path):
    ref = write_run(tmp_path / "a", "a", 100, 100, lambda s: 1.0 + s / 100)
    other = write_run(tmp_path / "b", "b", 40, 100, lambda s: 2.0 + s / 100)
    _, b = summarize(read_runs([str(ref), str(other)]))
    # steps 37..40 (the last 10% of 40) on both: means 1.385 and 2.385
    assert b.gap_basis == "train (trailing mean) at step 40"
    assert b.gap_pct == pytest.approx(100 * (2.385 - 1.385) / 1.385)


def test_a_run_short_of_its_plan_is_marked_in_progress(runs, tmp_path, capsys):
    ref, long, live = summarize(read_runs(runs))
    assert [s.in_progress for s in (ref, long, live)] == [False, False, True]
    assert (live.steps, live.planned_steps) == (10, 300)
    out = tmp_path / "report"
    assert main(["report", *runs, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    basis = "train (trailing mean) at step 10"
    assert lines[2] == f"live: step 10/300 IN PROGRESS, train 3.1000, gap +3.33% ({basis})"
    assert "IN PROGRESS" not in lines[0] + lines[1]
    page = (out / "report.html").read_text()
    assert "<td>10 / 300 <span class=live>in progress</span></td>" in page
    assert "<td>300 / 300</td>" in page and "validation at step 60" in page


def test_no_common_metric_is_said(tmp_path):
    ref = write_run(tmp_path / "a", "a", 0, 10, float, val={5: 2.0})  # evaluation only
    other = write_run(tmp_path / "b", "b", 10, 10, lambda s: 2.0)  # training only
    _, b = summarize(read_runs([str(ref), str(other)]))
    assert (b.gap_pct, b.gap_basis) == (None, "no common metric")
