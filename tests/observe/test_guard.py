"""The precision guard (observe/guard.py): decisions on given statistics, the chain,
state round trips; end to end, a saturating layer falls back and a resume keeps it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from torch import nn

import lptrain
from lptrain import recipes, safeload
from lptrain.config.precision import resolve_overrides
from lptrain.config.schema import ConfigError, GuardConfig, parse
from lptrain.models import converters
from lptrain.observe import check, check_model
from lptrain.observe.guard import PrecisionGuard
from lptrain.testing import runs

CFG = GuardConfig(enabled=True, min_sqnr_db=5.0, max_saturated=0.1, patience=2)


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))


def _model():
    return lptrain.convert(_plain(), "nvfp4")


def _stats(sqnr=15.0, saturated=0.01, layers=("0", "2")):
    good = {"sqnr_db": 15.0, "saturated": 0.01}
    return {
        n: {"output.input": {"sqnr_db": sqnr, "saturated": saturated}, "output.weight": good}
        for n in layers
    }


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lptrain.nn.Linear)}


def test_falls_back_after_patience_bad_checks_then_down_the_chain():
    model = _model()
    guard, layers = PrecisionGuard(CFG, recipes.get("nvfp4")), _layers(model)
    bad = {**_stats(saturated=0.5, layers=("0",)), **_stats(layers=("2",))}
    assert guard.check(1, bad, layers) == []  # one bad check: not yet
    assert guard.check(2, _stats(), layers) == []  # a good one resets the streak
    assert guard.check(3, bad, layers) == []
    (ev,) = guard.check(4, bad, layers)
    assert ev["layer"] == "0" and (ev["from"], ev["to"]) == ("nvfp4", "fp8-current")
    assert "output.input saturated 0.5000 > 0.1 for 2 checks" == ev["reason"]
    assert model[0].recipe.name == "fp8-current" and model[2].recipe.name == "nvfp4"
    low = _stats(sqnr=1.0, layers=("0",))
    assert guard.check(5, low, layers) == []
    assert guard.check(6, low, layers)[0]["to"] == "bf16"
    assert guard.check(7, low, layers) == [] and guard.check(8, low, layers) == []  # chain end
    assert guard.state.level == {"0": 1} and guard.state.recipe["0"]["name"] == "bf16"


def test_gemm_granularity_moves_only_the_failing_gemm_down_the_chain():
    model, nvfp4, fp8 = _model(), recipes.get("nvfp4"), recipes.get("fp8-current")
    guard = PrecisionGuard(replace(CFG, granularity="gemm"), nvfp4)
    low = {"sqnr_db": 1.0, "saturated": 0.0}
    bad = {"0": {**_stats(layers=("0",))["0"], "output.input": low, "grad_weight.input": low}}
    assert guard.check(1, bad, _layers(model)) == []
    fwd, wgrad = guard.check(2, bad, _layers(model))  # each GEMM its own streak and position
    assert fwd == {"kind": "guard", "step": 2, "layer": "0", "gemm": "output",
                   "operand": "input", "from": "nvfp4", "to": "nvfp4[output=fp8-current]",
                   "reason": "output.input sqnr_db 1.00 < 5 for 2 checks"}  # fmt: skip
    assert (wgrad["gemm"], wgrad["operand"], wgrad["from"]) == (
        "grad_weight",
        "input",
        "nvfp4[output=fp8-current]",
    )
    r = model[0].recipe
    assert r.name == "nvfp4[output=fp8-current, grad_weight=fp8-current]"
    assert (r.output, r.grad_weight, r.grad_input) == (
        fp8.output,
        fp8.grad_weight,
        nvfp4.grad_input,
    )
    assert model[2].recipe == nvfp4
    only_fwd = {"0": {**bad["0"], "grad_weight.input": {"sqnr_db": 15.0, "saturated": 0.0}}}
    guard.check(3, only_fwd, _layers(model))
    (ev,) = guard.check(4, only_fwd, _layers(model))
    assert ev["to"] == "nvfp4[grad_weight=fp8-current, output=bf16]"
    assert guard.state.level == {"0:output": 1, "0:grad_weight": 0}
    assert guard.state.recipe["0"]["name"] == ev["to"]
    guard.reset(model)
    assert model[0].recipe == nvfp4


def test_a_chain_step_that_changes_nothing_is_passed_over():
    model = lptrain.convert(nn.Sequential(nn.Linear(32, 32)), "fp8-current")
    guard = PrecisionGuard(replace(CFG, granularity="gemm"), recipes.get("fp8-current"))
    bad = {"0": {"output.weight": {"sqnr_db": 1.0, "saturated": 0.0}}}
    guard.check(1, bad, _layers(model))
    (ev,) = guard.check(2, bad, _layers(model))  # fp8-current, first in the chain, is no step
    assert (ev["from"], ev["to"]) == ("fp8-current", "fp8-current[output=bf16]")


def test_fallbacks_keep_the_layers_overrides():
    raw = {"run": {"max_steps": 2}, "precision": {"recipe": "nvfp4", "skip": [], "overrides": [
        {"layers": ["0"], "gemm": "grad_weight", "recipe": "bf16"}]}}  # fmt: skip
    cfg = parse(raw).precision
    model = converters.apply(_plain(), converters.build(parse(raw), ("precision",)),
                             converters.ConvertContext(0, 0, 1, lambda _: None))  # fmt: skip
    guard = PrecisionGuard(CFG, recipes.get("nvfp4"), resolve_overrides(cfg))
    bad = _stats(sqnr=1.0)
    guard.check(1, bad, _layers(model))
    (ev0, ev2) = guard.check(2, bad, _layers(model))
    assert (ev0["from"], ev0["to"]) == ("nvfp4[grad_weight=bf16]", "fp8-current[grad_weight=bf16]")
    assert (ev2["from"], ev2["to"]) == ("nvfp4", "fp8-current")
    guard.reset(model)  # back where the conversion put them, overrides included
    assert [model[i].recipe.name for i in (0, 2)] == ["nvfp4[grad_weight=bf16]", "nvfp4"]


def test_watched_layers_and_operands_only():
    cfg = GuardConfig(enabled=True, patience=1, layers=["2"], operands=["output.weight"])
    guard, model = PrecisionGuard(cfg, recipes.get("nvfp4")), _model()
    assert guard.check(1, _stats(saturated=0.9), _layers(model)) == []  # output.input ignored


def test_state_round_trip_restores_the_recipes_on_a_fresh_model():
    guard, model = PrecisionGuard(CFG, recipes.get("nvfp4")), _model()
    bad = _stats(sqnr=0.0, layers=("2",))
    for step in (1, 2):
        guard.check(step, bad, _layers(model))
    # The resumed run edited its fallback chain: the saved recipes still come back exactly.
    edited = GuardConfig(enabled=True, fallback=["mxfp8"])
    fresh, again = _model(), PrecisionGuard(edited, recipes.get("nvfp4"))
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    again.apply(fresh, again.state.recipe)
    assert fresh[2].recipe.name == "fp8-current" and fresh[0].recipe.name == "nvfp4"
    fresh.load_state_dict(model.state_dict())  # the keys match the switched recipes
    fresh[0].set_recipe(recipes.get("mxfp8"))  # not the guard's doing: left alone
    again.apply(fresh, {}, moved=again.state.recipe)  # the fallback undone
    assert fresh[2].recipe.name == "nvfp4" and fresh[0].recipe.name == "mxfp8"


def test_config_errors_name_the_key():
    raw = {"run": {"max_steps": 2}, "precision": {"guard": {"enabled": True}}}
    with pytest.raises(ConfigError, match=r"^precision\.guard\.fallback\[1\]: unknown recipe"):
        check(parse({**raw, "precision": {"guard": {"enabled": True, "fallback": ["bf16", "x"]}}}))
    typo = ["*.input", "output.wieght"]
    with pytest.raises(ConfigError, match=r"^precision\.guard\.operands\[1\]: 'output\.wieght' "):
        parse({**raw, "precision": {"guard": {"enabled": True, "operands": typo}}})
    with pytest.raises(ConfigError, match=r"^precision\.guard\.patience: must be >= 1"):
        parse({**raw, "precision": {"guard": {"patience": 0}}})
    with pytest.raises(ConfigError, match=r"^monitor\.end_step: 3 < start_step 5"):
        parse({**raw, "monitor": {"start_step": 5, "end_step": 3}})
    with pytest.raises(ConfigError, match=r"^monitor\.stats\[0\]: expected one of"):
        parse({**raw, "monitor": {"stats": ["sqnr"]}})


def test_layer_globs_that_match_nothing_are_refused():
    model = _model()  # layers "0" and "2"
    raw = {"run": {"max_steps": 2}, "monitor": {"layers": ["attn.*"]}}
    with pytest.raises(
        ConfigError,
        match=r"^monitor\.layers: \['attn\.\*'\] match no linear layer; the model has 0, 2$",
    ):
        check_model(parse(raw), model)
    check_model(parse({**raw, "monitor": {"layers": ["attn.*"], "interval": 0}}), model)  # off
    guard = {"precision": {"guard": {"enabled": True, "layers": ["3"]}}}
    with pytest.raises(ConfigError, match=r"^precision\.guard\.layers: \['3'\] match no lptrain"):
        check_model(parse({"run": {"max_steps": 2}, **guard}), model)
    check_model(parse({"run": {"max_steps": 2}, "monitor": {"layers": ["2"]}}), model)
    with pytest.warns(
        UserWarning, match=r"^monitor\.layers: \['attn\.\*'\] match no linear layer \("
    ):
        check_model(parse({"run": {"max_steps": 2}, "monitor": {"layers": ["2", "attn.*"]}}), model)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))  # what an fp32 or bf16 recipe leaves
    with pytest.raises(ConfigError, match=r"^precision\.guard\.enabled: precision\.recipe fp32 "
                       "quantizes no layer"):  # fmt: skip
        check_model(parse({"run": {"max_steps": 2}, "precision": {"guard": {"enabled": True}}}),
                    plain)  # fmt: skip


def test_the_cli_refuses_them_in_one_line(cli):
    proc = cli("tiny-fp32.yaml", "monitor.layers=[blocks.*]", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: monitor.layers: ['blocks.*'] match no linear layer; the model has ")
    )


# End to end: NVFP4 with the weight's tensor scale held (sample-and-hold, amax_refresh) in one
# layer, whose weight then grows 64x after step 2: its blocks outgrow the held reference and
# saturate (most elements clip). The guard moves that layer, and only that one, to
# fp8-current; the run stops at step 5 and a resume keeps the fallback.
HELD = "{base: nvfp4, name: nvfp4-held, output: {weight: {amax_refresh: 1000}}}"
GROW = textwrap.dedent("""
    import sys, torch
    from lptrain.models import converters
    after_step = converters.after_step
    def grow(model, convs, step):
        after_step(model, convs, step)
        if step == 2:
            with torch.no_grad():
                dict(model.named_modules())["layers.0.mlp.w1"].weight.mul_(64.0)
    converters.after_step = grow
    from lptrain.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _guard_state(run_dir, step: int) -> dict:
    side = run_dir / "checkpoints" / f"step{step:08d}" / "lptrain_rank0.pt"
    return safeload.load(side, "test")["extra"]["monitoring"]["guard"]


def test_a_saturating_layer_falls_back_and_a_resume_keeps_it(tmp_path, monitored_runs):
    run_dir = tmp_path / "run"
    sets = [
        f"precision.recipe={HELD}",
        "run.max_steps=8",
        "run.stop_at_step=5",
        "monitor.interval=1",
        "monitor.stats=[saturated, scale]",
        "precision.guard.enabled=true",
        "precision.guard.interval=1",
        "precision.guard.patience=2",
        "precision.guard.operands=[output.weight]",
        "precision.guard.min_sqnr_db=null",  # saturation alone decides here
        f"data.cache_dir={monitored_runs.cache}",
    ]
    first = runs.train("tiny-fp32.yaml", run_dir, *sets, code=GROW)
    assert "step 4: layers.0.mlp.w1 nvfp4-held -> fp8-current" in first.stderr
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    (guard,) = [e for e in events if e["kind"] == "guard"]
    assert guard["step"] == 4 and "output.weight saturated" in guard["reason"]
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "layers.jsonl").open())}
    key = "quant/layers.0.mlp.w1/output.weight"
    assert rows[2][f"{key}/saturated"] < 0.05 and rows[3][f"{key}/saturated"] > 0.5
    assert f"{key}/scale" in rows[5] and f"{key}/scale_max" not in rows[5]  # per-tensor now
    # Resumed with the guard off: no new fallbacks, the old one stays and is saved again.
    off = [*sets[:2], *sets[3:], "precision.guard.enabled=false"]
    second = runs.train("tiny-fp32.yaml", run_dir, *off, code=GROW)
    assert "resumed from" in second.stderr
    assert "precision guard: 1 fallback(s)" in second.stderr
    assert "step 4: layers.0.mlp.w1 nvfp4-held -> fp8-current" in second.stderr
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "layers.jsonl").open())}
    assert set(rows) == set(range(1, 9))
    assert f"{key}/scale" in rows[8] and rows[8][f"{key}/saturated"] < 0.05
    assert "quant/layers.1.mlp.w1/output.weight/scale_max" in rows[8]  # the rest stay NVFP4
    assert _guard_state(run_dir, 8)["recipe"]["layers.0.mlp.w1"]["name"] == "fp8-current"
    again = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in again if e["kind"] in ("guard", "resume")] == ["guard", "resume"]
    # The event counts continue across the resume (they restarted at 0 before).
    metrics = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    assert (metrics[5]["events/guard"], metrics[8]["events/guard"]) == (1, 1)
    assert metrics[8]["events/resume"] == 1
    # precision.guard.reset: the layer goes back to the run's recipe (per-block scales again).
    third = runs.train("tiny-fp32.yaml", run_dir, *off, "run.max_steps=9",
                       "precision.guard.reset=true", code=GROW)  # fmt: skip
    assert "precision.guard.reset: 1 layer(s) back on the run's recipe" in third.stderr
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "layers.jsonl").open())}
    assert f"{key}/scale_max" in rows[9] and f"{key}/scale" not in rows[9]
    assert _guard_state(run_dir, 9)["recipe"] == {}


def test_a_healthy_run_never_falls_back(monitored_runs):
    run_dir = monitored_runs["monitored"]
    events = (run_dir / "events.jsonl").read_text() if (run_dir / "events.jsonl").exists() else ""
    assert '"guard"' not in events
    assert "precision guard: 0 fallback(s)" in monitored_runs.stderr["monitored"]


# End to end, one process for every command (imports paid once): MXFP8 with the grad_weight
# GEMM of block 0 in high precision (precision.overrides), and the guard at GEMM granularity
# on one layer whose output.input cannot meet its bound: that GEMM alone falls back, at step
# 1 (to fp8-current) and 2 (to bf16). Stopped at step 1 and resumed, the run is bit-equal to
# the uninterrupted one; its int export rebuilds every layer's recipe.
MIXED = [
    "precision.recipe=mxfp8",
    "precision.overrides=[{layers: [layers.0.*], gemm: grad_weight, recipe: bf16}]",
    "precision.guard.enabled=true",
    "precision.guard.granularity=gemm",
    "precision.guard.interval=1",
    "precision.guard.patience=1",
    "precision.guard.layers=[layers.1.attn.wq]",
    "precision.guard.operands=[output.input]",
    "precision.guard.min_sqnr_db=1000",  # out of any recipe's reach
    "precision.guard.max_saturated=null",
    "run.max_steps=3",
    "run.eval_interval=3",
    "monitor.interval=0",
]
ALL = """import json, sys
from lptrain.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv):
        sys.exit(f"failed: lptrain {' '.join(argv)}")
"""


def test_a_mixed_recipe_run_falls_back_one_gemm_resumes_bit_for_bit_and_exports(
    tmp_path, monitored_runs
):
    from lptrain.export import restore

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*runs.NANO, *MIXED, f"data.cache_dir={monitored_runs.cache}"]

    def train(run_dir, *more):
        args = ["train", str(runs.RECIPES / "tiny-fp32.yaml"), "--run-dir", str(run_dir)]
        return args + [a for kv in [*common, *more] for a in ("--set", kv)]

    argvs = [train(whole), train(parts, "run.stop_at_step=1"), train(parts),
             ["export", str(whole), "--blocks", "64"]]  # fmt: skip
    cmd = [sys.executable, "-c", ALL, json.dumps(argvs)]
    env = runs.clean_env()
    proc = subprocess.run(cmd, cwd=runs.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").open()) if "loss" in r]
              for d in (whole, parts)]  # fmt: skip
    assert len(losses[0]) == 3 and losses[0] == losses[1]  # bit for bit across the resume
    wq = "layers.1.attn.wq"
    for d in (whole, parts):
        evs = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
        got = [(e["step"], e["layer"], e["gemm"], e["operand"], e["to"])
               for e in evs if e["kind"] == "guard"]  # fmt: skip
        assert got == [(1, wq, "output", "input", "mxfp8[output=fp8-current]"),
                       (2, wq, "output", "input", "mxfp8[output=bf16]")]  # fmt: skip
        state = _guard_state(d, 3)
        assert state["level"] == {f"{wq}:output": 1} and list(state["recipe"]) == [wq]
    opened = restore.open_export(whole / "export")
    names = {n: m.recipe.name for n, m in opened.model.named_modules()
             if isinstance(m, lptrain.nn.Linear)}  # fmt: skip
    assert names["layers.0.attn.wq"] == names["layers.0.mlp.w2"] == "mxfp8[grad_weight=bf16]"
    assert names["layers.1.mlp.w1"] == "mxfp8" and names[wq] == "mxfp8[output=bf16]"
    # The export is the trained model: its loss is the run's last validation loss (the same
    # 4 x 16 blocks, bit for bit; without the fallback in place it was 2e-6 off).
    (val,) = [r["val_loss"] for r in map(json.loads, (whole / "metrics.jsonl").open())
              if "val_loss" in r]  # fmt: skip
    export = json.loads((whole / "export" / "lptrain_export.json").read_text())["val_loss"]
    assert export["trained"] == export["export"] == val, (export, val)
