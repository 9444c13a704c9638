"""benchmarks/loss_study.py's claims8 suite without training: the runs it builds on STUDY8 and
on a GPU run file (`--base`), and how the report turns paired gaps into verdicts."""

from __future__ import annotations

import importlib
import sys

import pytest

from lptrain.config.precision import resolve_recipe
from lptrain.config.schema import load
from lptrain.testing.study import STUDY8
from tests.helpers import REPO


@pytest.fixture
def study(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its sibling imports
    return importlib.import_module("loss_study")


@pytest.fixture
def report(study):
    return importlib.import_module("loss_study_report")


FP4_CLAIMS = ("fp4-ue5m3", "fp4-ue5m3-no-hadamard", "fp4-ue5m3-nearest-grads",
              "fp4-ue5m3-e4m3-scales")  # fmt: skip


def _check_loads(run) -> None:
    """The command's run file and overrides make a valid config whose recipe resolves."""
    cfg = load(REPO / run.base, run.overrides())
    resolve_recipe(cfg.precision)


def test_claims8_on_study8_pairs_every_claim_at_every_seed(study):
    runs = study.suite_runs_of(["claims8"], (0, 1, 2), None)
    names = [r.name for r in runs]
    claims = [f"s8:{lb}-s{s}" for s in (0, 1, 2) for lb in study.CLAIMS8_RECIPES]
    # seed-major: an interrupted study has whole seeds of every pair
    assert names[: len(claims)] == claims
    lr_runs = runs[len(claims) :]
    assert sorted(r.name for r in lr_runs) == sorted(
        f"s8:{lb}@lr{lr}-s{s}"
        for lb in ("fp32", "fp8-delayed", "fp4-ue5m3")
        for lr in ("0.009", "0.024")
        for s in (0, 1)
    )
    for r in runs:
        assert r.base == study.BASE_RECIPE and r.setup == STUDY8
    assert lr_runs[0].overrides()[-1].startswith("optim.lr=")  # the sweep's rate wins
    assert len({r.key for r in runs}) == len(runs)
    for r in runs[:7]:
        _check_loads(r)
    # more seeds for the claims (`--seeds 3,4`) add no sweep runs
    more = study.suite_runs_of(["claims8"], (3, 4), None)
    assert len(more) == 2 * len(study.CLAIMS8_RECIPES) and "@" not in "".join(r.name for r in more)


def test_claims8_on_a_gpu_run_file_keeps_its_model_and_scales_its_lr(study):
    base = "recipes/pretrain/gpu-125m-fp8.yaml"
    runs = study.suite_runs_of(["claims8"], (0, 1, 2), None, base)
    assert len(runs) == 7 * 3 + 3 * 2 * 2
    ref = runs[0]
    # the run file trains in DeepSpeed bf16: its reference is bf16, not fp32 under bf16
    assert ref.name == "gpu-125m-fp8:bf16-s0"
    assert ref.overrides()[-3:] == ["precision.recipe=bf16", "deepspeed.dtype=bf16", "run.seed=0"]
    assert ref.command()[4] == str(REPO / base)
    assert not any(o.startswith("model.") for r in runs for o in r.overrides())
    assert {r.extra for r in runs} == {(), ("optim.lr=0.0018",), ("optim.lr=0.0048",)}
    cfg = load(REPO / base, runs[1].overrides())
    assert cfg.model.preset == "125m" and cfg.precision.recipe == "fp8-delayed"
    for r in runs[:7]:
        _check_loads(r)
    # the same recipe and seed on another run file is another result
    assert runs[1].key != study.suite_runs_of(["claims8"], (0,), None)[1].key


def test_base_is_refused_outside_claims8(study, monkeypatch, capsys):
    argv = ["loss_study.py", "--suite", "main", "--base", "recipes/pretrain/gpu-125m-fp8.yaml"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        study.main()
    assert e.value.code == 2
    assert "--base: only the claims8 suite takes a run file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("diffs", "sign", "expected"),
    [
        ([-0.010, -0.012, -0.008], -1, "reproduced"),  # mean/se = -8.7
        ([-0.010, -0.012, -0.008], 1, "contradicted"),
        ([-0.010, -0.012, -0.008], 0, "contradicted"),  # a difference where none was reported
        ([-0.010, -0.012, 0.001], -1, "unresolved"),  # one seed the other way
        ([-0.010, -0.030, -0.001], -1, "unresolved"),  # mean/se = -1.8 < 2
        ([-0.010, float("nan"), -0.008], -1, "diverged"),
    ],
)
def test_claim_verdict(report, diffs, sign, expected):
    assert report.claim_verdict(diffs, sign) == expected


def test_claims8_table_pairs_by_seed(report):
    def runs(*finals):
        return {s: {"final": f} for s, f in enumerate(finals)}

    g = {
        "fp4-ue5m3-no-hadamard": runs(2.30, 2.40, 2.20),
        "fp4-ue5m3": runs(2.29, 2.38, 2.195),  # below at every seed, whatever the seed's level
        "fp8-current": runs(2.10, 2.20, 2.00),
        "fp8-delayed": runs(2.11, 2.19, 2.003),
    }
    rows = report.claims8_table(g).splitlines()[2:]
    assert len(rows) == 2  # only the claims whose two recipes ran
    hadamard, fp8 = (r.split(" | ") for r in rows)
    # mean -0.01167, sd 0.00764, se 0.00441
    assert hadamard[3:7] == ["-0.0100, -0.0200, -0.0050", "-0.0117 ± 0.0076", "-2.6", "reproduced"]
    assert hadamard[7] == "-0.0045 ± 0.0187 |"  # the nano study's
    assert fp8[3:5] == ["+0.0100, -0.0100, +0.0030", "0.0010 ± 0.0101"]
    assert fp8[6] == "unresolved"


def test_set_overrides_every_run_after_its_own(study):
    runs = study.suite_runs_of(["ci"], (0,), ["fp32", "nvfp4"])
    cand = study.with_sets(runs, ["data.block_size=64", "optim.lr=3e-3"])  # the first CI setup
    assert [r.name for r in cand] == [r.name for r in runs]  # still paired as in the suite
    for r in cand:
        cfg = load(REPO / r.base, r.overrides())
        assert (cfg.data.block_size, cfg.optim.lr) == (64, 3e-3)  # the candidate's, not CI's
    assert {r.key for r in cand}.isdisjoint(r.key for r in runs)


def test_a_bad_set_is_refused_naming_the_key(study, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["loss_study.py", "--suite", "ci", "--set", "optim.lr=fast"])
    with pytest.raises(SystemExit) as e:
        study.main()
    assert e.value.code == 2
    assert "optim.lr" in capsys.readouterr().err
