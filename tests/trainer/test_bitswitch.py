"""Bit switching end to end (trainer/bitswitch.py, export/switch.py, recipes/qat/): a nano base
pretrained once for the module, the HASB recipe fine-tuned for a few steps under ZeRO-2 (with
self-distillation), its ALRS learning rates as the optimizer really used them, exact resume,
ZeRO-0 and two ranks under ZeRO-3 against one, `lptrain switch` to every bit-width and two
budgets from the int8 export (bit for bit the training model at that bit-width), eval, and
bad input."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import FAST, REPO, free_port, lptrain, metrics, sets

from .test_finetune import in_process

MIXED = REPO / "recipes" / "qat" / "bitswitch-mixed.yaml"
STEPS = 3
BITS = (8, 6, 4, 2)
# Switch from the first step and on every pass: the roulette path runs in every pass. A
# moderate lr: at 1e-2 a 2-bit pass turns last-ulp differences between ZeRO stages into
# different roundings and visibly different losses within three steps.
HASB = ["bitswitch.hasb.warmup_steps=0", "bitswitch.hasb.sigma=1.0", "bitswitch.distill=0.5",
        "optim.lr=2e-3"]  # fmt: skip


def bitswitch(run_dir, base, cache, *overrides, **kw):
    return lptrain(
        "train", MIXED, "--run-dir", run_dir,
        *sets(*FAST, f"data.cache_dir={cache}", f"init.from={base}", f"run.max_steps={STEPS}",
              *HASB, *overrides),
        **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_cache, pretrained_base) -> dict:
    root = tmp_path_factory.mktemp("bitswitch")
    base = pretrained_base
    run = root / "mixed"
    proc = bitswitch(run, base, data_cache)
    return {"root": root, "base": base, "cache": data_cache, "run": run, "log": proc.stderr}


def test_joint_step_runs_every_bit_with_alrs_and_hasb(work):
    from lptrain.config import schema
    from lptrain.distributed import engine

    assert "Hessian traces of 14 layers" in work["log"]
    cfg = schema.load(work["run"] / "config.yaml")
    factor = engine.lr_lambda(cfg, STEPS)
    rows = [r for r in metrics(work["run"]) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        t = r["step"] - 1  # the training step these updates belong to
        losses = [r[f"loss_b{b}"] for b in BITS]
        assert all(math.isfinite(x) for x in losses)
        assert r["loss"] == pytest.approx(sum(losses) / 4)
        # grad_norm is the largest pass's (before its clip); each pass's is in the row.
        assert r["grad_norm"] == max(r[f"grad_norm_b{b}"] for b in BITS)
        for k, b in enumerate(BITS):  # what the torch optimizer saw at each of the 4 updates
            assert r[f"lr_b{b}"] == pytest.approx(cfg.optim.lr * factor(t), rel=1e-12)
            want = cfg.optim.lr * factor(t) * 0.1**k  # ALRS: alpha^k on the quantizer group
            assert r[f"lr_quantizer_b{b}"] == pytest.approx(want, rel=1e-12)
        # Restored after the batch: the plain schedule's next value, as in a plain run.
        assert r["lr"] == pytest.approx(cfg.optim.lr * factor(t + 1), rel=1e-12)
        assert r["hasb_sigma"] == pytest.approx((t + 1) / STEPS)
        assert sum(r[f"switched_b{b}"] for b in BITS) > 0


def test_resume_is_exact(work, tmp_path):
    run = tmp_path / "resumed"
    bitswitch(run, work["base"], work["cache"], "run.stop_at_step=2")
    bitswitch(run, work["base"], work["cache"])
    keys = ["loss", *(f"loss_b{b}" for b in BITS), *(f"switched_b{b}" for b in BITS)]
    got = [[r[k] for k in keys] for r in metrics(run) if "loss" in r]
    want = [[r[k] for k in keys] for r in metrics(work["run"]) if "loss" in r]
    assert got == want


@pytest.mark.slow
def test_zero_0_and_two_ranks_zero_3_match_one(work, tmp_path):
    ref = [r for r in metrics(work["run"]) if "loss" in r]
    zero0 = tmp_path / "zero0"
    bitswitch(zero0, work["base"], work["cache"], "deepspeed.zero_stage=0")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--master_port", str(free_port())]  # fmt: skip
    two = tmp_path / "two"
    bitswitch(two, work["base"], work["cache"], "deepspeed.zero_stage=3",
              "deepspeed.micro_batch=4", launcher=torchrun, timeout=300)  # fmt: skip
    exact = [*(f"switched_b{b}" for b in BITS), *(f"lr_quantizer_b{b}" for b in BITS)]
    for run in (zero0, two):
        rows = [r for r in metrics(run) if "loss" in r]
        assert len(rows) == STEPS
        for r, w in zip(rows, ref, strict=True):  # the same HASB draws and ALRS rates
            assert [r[k] for k in exact] == pytest.approx([w[k] for k in exact], rel=1e-12)
            # Reduction order differs (stage, ranks); a wrong draw or rate moves these by 1e-2.
            got, want = [r[f"loss_b{b}"] for b in BITS], [w[f"loss_b{b}"] for b in BITS]
            assert got == pytest.approx(want, rel=1e-5 if r["step"] == 1 else 2e-4), (run, r)


def test_switch_every_bit_and_budgets_from_the_int8_export(work, capsys):
    from lptrain.export import restore, switch
    from lptrain.qat import bitswitch as bs

    run = work["run"]
    code, out, _ = in_process(capsys, "export", run, "--blocks", 8)
    assert code == 0 and "double rounding: int8 codes" in out
    trained = restore.open_run(run).model
    tokens = torch.randint(1, 257, (2, 33), generator=torch.Generator().manual_seed(0))
    for b in BITS:
        code, out, _ = in_process(capsys, "switch", run / "export", "--bits", b, "--blocks", 8)
        assert code == 0 and f"export: {run / f'export-b{b}'}" in out
        bs.set_bits(trained, b)
        with torch.no_grad():
            want = trained.logits(tokens)
            got = restore.open_export(run / f"export-b{b}").model.logits(tokens)
        assert torch.equal(got, want), b  # the deployable model is the training forward
    meta = json.loads((run / "export-b2/lptrain_export.json").read_text())
    assert meta["switch"] == {"bits": 2} and meta["layers"]["layers.0.mlp.w1"]["bits"] == 2
    # Codes packed at their bit-width: the exports shrink with it (2 bits: four per byte).
    size = {b: (run / f"export-b{b}" / "model.safetensors").stat().st_size for b in BITS}
    assert size[8] > size[6] > size[4] > size[2], size
    for b in BITS:
        lay = json.loads((run / f"export-b{b}/lptrain_export.json").read_text())["layers"]
        w1 = restore.open_export(run / f"export-b{b}").model.get_submodule("layers.0.mlp.w1")
        assert lay["layers.0.mlp.w1"]["code_bits"] == b
        assert w1.codes.numel() == w1.out_features * w1.in_features * b // 8
    for budget in (3, 4.5):
        code, out, _ = in_process(capsys, "switch", run, "--budget", budget, "--blocks", 8)
        assert code == 0 and "per-layer bit-widths" in out and "layers.1.mlp.w2" in out
        meta = json.loads((run / f"export-avg{budget:g}/lptrain_export.json").read_text())
        rec = meta["switch"]
        assert rec["hessian"] and rec["average_bits"] <= budget and len(rec["layers"]) == 14
        # The budget counts what the export stores: packed codes, steps and input steps.
        model = restore.open_export(run / f"export-avg{budget:g}").model
        layers = [model.get_submodule(name) for name in rec["layers"]]
        weights = sum(m.in_features * m.out_features for m in layers)
        assert rec["average_bits"] == 8 * sum(m.stored_bytes() for m in layers) / weights
        assert (
            rec["unit"].startswith("stored bits per weight")
            and f"average {rec['average_bits']:.4f} stored bits per weight" in out
        )
        assert rec["nominal_bits"] < rec["average_bits"]
        code, ev, _ = in_process(capsys, "eval", run / f"export-avg{budget:g}", "--blocks", 8)
        assert code == 0 and "perplexity" in ev
        # The budgeted model equals the training model with those per-layer bit-widths.
        bs.set_bits(trained, rec["layers"])
        with torch.no_grad():
            want = trained.logits(tokens)
        mixed = switch.switched_model(run / "export", rec["layers"]).model
        assert torch.equal(mixed.logits(tokens), want)
    code, _, err = in_process(capsys, "switch", run, "--bits", 3)
    assert code == 2 and err == "error: --bits: 3 is not a candidate bit-width [8, 6, 4, 2]\n"
    code, _, err = in_process(capsys, "switch", run, "--budget", 9)
    assert code == 2 and err.startswith("error: --budget: must be in [2.")
    assert err.endswith("stored bits per weight (2 to 8 bits with their scales), got 9\n")
    code, _, err = in_process(capsys, "switch", work["base"], "--bits", 4)
    assert code == 2 and "has no bit-switching layers" in err
    code, _, err = in_process(capsys, "switch", run, "--bits", 4)
    assert code == 2 and "already exists" in err


def test_bad_recipes_are_one_line(work, tmp_path, capsys):
    run = tmp_path / "never"
    cases = [
        ("bitswitch.bits=[8,9]", "bitswitch.bits: each must be an integer in 2..8, got 9"),
        ("bitswitch.rounding=up", "bitswitch.rounding: expected one of 'nearest' | 'shift'"),
        ("bitswitch.alrs_alpha=0", "bitswitch.alrs_alpha: must be in (0, 1], got 0"),
        ("bitswitch.eval_bits=5", "bitswitch.eval_bits: 5 is not one of bits [8, 6, 4, 2]"),
        ("bitswitch.bits=[4]", "bitswitch.hasb.enabled: needs at least two bit-widths"),
        ("precision.recipe=fp8-current", "bitswitch.hasb.enabled: needs precision.recipe fp32"),
        ("qat.method=lsq", "bitswitch.bits: bit switching with qat.method lsq is not supported"),
    ]
    for override, message in cases:
        argv = ["train", MIXED, "--run-dir", run,
                *sets(f"init.from={work['base']}", override)]  # fmt: skip
        code, _, err = in_process(capsys, *argv)
        assert code == 2 and err.startswith(f"error: {message}"), err
    assert not run.exists()


def test_distiller_mixes_the_teacher_into_later_passes():
    from lptrain.config.schema import ModelConfig
    from lptrain.models.decoder import build_model
    from lptrain.trainer.bitswitch import Distiller

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="nano"), 257, 16).train()
    tokens = torch.randint(1, 257, (2, 17), generator=torch.Generator().manual_seed(0))
    d = Distiller(model, alpha=0.3)
    with d.pass_(teacher=True):
        plain_teacher = model(tokens)
    teacher = model.logits(tokens[:, :-1]).detach().softmax(-1)
    with torch.no_grad():  # the student: other weights
        model.lm_head.weight.mul_(0.5)
    plain = model(tokens)
    with d.pass_(teacher=False):
        mixed = model(tokens)
    student = model.logits(tokens[:, :-1]).flatten(0, 1)
    soft = F.cross_entropy(student, teacher.flatten(0, 1))
    torch.testing.assert_close(mixed, 0.7 * plain + 0.3 * soft, rtol=1e-6, atol=1e-6)
    assert plain_teacher.isfinite() and len(d.teacher) == 1
    assert torch.equal(model(tokens), plain)  # the hooks are gone after the pass
    with d.pass_(teacher=False), torch.no_grad():  # evaluation is never mixed
        assert torch.equal(model.eval()(tokens), plain)


def test_bitswitch_section_round_trips(tmp_path):
    from lptrain.config.schema import load, parse, to_yaml

    section = {"bits": [2, 8, 4], "scale_grad": "faithful", "hasb": {"enabled": True}}
    raw = {"run": {"max_steps": 1}, "bitswitch": section}
    cfg = parse(raw)
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    again = load(tmp_path / "c.yaml")
    assert again.bitswitch == cfg.bitswitch and again.bitswitch.hasb.enabled
    from lptrain.config.finetune import bitswitch_config

    assert bitswitch_config(again.bitswitch).bits == (8, 4, 2)  # highest first
