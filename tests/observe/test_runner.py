"""Monitoring around the training step (observe/runner.py), end to end."""

from __future__ import annotations

import json

import pytest


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_monitoring_does_not_change_training(monitored_runs):
    """Per-layer statistics, gradient norms, update ratios, the fidelity probe, the guard and
    an MXFP6 shadow at every step, against none of it: the loss sequence is bit for bit the
    same."""
    on = [r["loss"] for r in _lines(monitored_runs["monitored"] / "metrics.jsonl") if "loss" in r]
    off = [r["loss"] for r in _lines(monitored_runs["plain"] / "metrics.jsonl") if "loss" in r]
    assert len(on) == 4 and [x.hex() for x in on] == [x.hex() for x in off]
    assert not (monitored_runs["plain"] / "layers.jsonl").exists()


def test_rows_hold_every_layer_and_step_metric(monitored_runs):
    run_dir = monitored_runs["monitored"]
    rows = _lines(run_dir / "layers.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    projections = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")
    layers = [f"layers.{i}.{p}" for i in (0, 1) for p in projections]
    operands = ["output.input", "output.weight", "grad_input.grad_output", "grad_input.weight",
                "grad_weight.grad_output", "grad_weight.input"]  # fmt: skip
    stats = ["amax", "scale_min", "scale_max", "saturated", "underflow", "clamped", "sqnr_db",
             "dynamic_range"]  # fmt: skip
    want = {f"quant/{layer}/{op}/{s}" for layer in layers for op in operands for s in stats}
    # MXFP6 as a shadow: the same operands and statistics, named apart (monitor.shadow)
    want |= {f"shadow/mxfp6/{k[len('quant/') :]}" for k in want}
    for name in [*layers, "lm_head"]:
        want |= {f"grad/{name}/{k}" for k in ("norm", "cosine", "alignment")}
        want.add(f"weight/{name}/update_ratio")
    assert set(rows[0]) - {"step"} == want
    mxfp8_sqnr = [v for k, v in rows[-1].items() if k.startswith("quant/") and "sqnr" in k]
    assert min(mxfp8_sqnr) > 25  # E4M3 with 32-blocks: about 30 dB on this model
    # MXFP6 quantizes input and weight to E2M3, with E4M3's 3 mantissa bits (E8M0 blocks
    # absorb the range): SQNR within 4 dB (measured -3.1..+2.3); grad_output to E3M2, one
    # mantissa bit fewer: 3-9 dB below (measured 4.0..5.7; one bit is 6 dB on a uniform grid).
    for key, v in rows[-1].items():
        if key.startswith("quant/") and key.endswith("sqnr_db"):
            gap = v - rows[-1][key.replace("quant/", "shadow/mxfp6/")]
            assert 3 < gap < 9 if "grad_output" in key else abs(gap) < 4, (key, gap)
    # At initialization MXFP8's gradients point where FP32's do. (Later, as the batch gradient
    # shrinks against per-token gradients, the cosine of the first layers drops: step 4 has
    # 0.1-0.6 on this model, a real effect of the recipe, not of the probe.)
    assert all(0.99 < rows[0][f"grad/{n}/cosine"] < 1.0 for n in layers)
    assert rows[0]["grad/lm_head/cosine"] > 0.999
    train = [r for r in _lines(run_dir / "metrics.jsonl") if "loss" in r]
    for key in ("stability/spike_score", "stability/loss_ema", "stability/diverged",
                "perf/step_time_s", "perf/peak_rss_gib"):  # fmt: skip
        assert key in train[-1], key
    assert train[-1]["stability/diverged"] == 0.0 and train[-1]["perf/peak_rss_gib"] > 0.1


def test_adapter_model_rows_skip_weights_that_do_not_train():
    """L4Q under fp8-current: the frozen lm_head and the weightless recipe layers have no
    weight metrics (snapshotting them raised AttributeError), their GEMM statistics are kept."""
    from types import SimpleNamespace

    import torch

    import lptrain.nn as lpnn
    from lptrain import lora
    from lptrain.config import schema
    from lptrain.models.decoder import build_model
    from lptrain.observe.runner import Monitoring

    cfg = schema.parse({"run": {"max_steps": 1}, "monitor": {"interval": 1, "fidelity": True}})
    model = build_model(cfg.model.__class__(preset="nano"), vocab_size=257, max_seq_len=16)
    lora.apply(
        lpnn.convert(model, "fp8-current", backend="emulated"), {"type": "l4q", "group_size": 32}
    )
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    mon = Monitoring(cfg, model, 1, probe=tokens)

    def step(s, p):
        model(tokens).backward()
        mon.before_update()
        return SimpleNamespace(loss=1.0, skipped=False)

    row, _ = mon.after_step(1, mon.wrap(step)(None, SimpleNamespace(step=0)))
    assert set(row) - {"step"} and all(k.startswith("quant/") for k in set(row) - {"step"})
    assert "quant/layers.0.attn.wq.recipe_layer/output.weight/amax" in row


def test_each_statistic_keeps_its_own_schedule():
    """monitor.schedule overrides interval / start_step / end_step per statistic; a field it
    leaves null is monitor's own."""
    from lptrain.config import schema
    from lptrain.observe.runner import plan_rows

    raw = {
        "interval": 10,
        "start_step": 20,
        "stats": ["amax", "sqnr_db", "underflow"],
        "schedule": {
            "sqnr_db": {"interval": 5, "start_step": 0},
            "underflow": {"end_step": 30},
            "grad_norm": {"interval": 4},
        },
    }
    m = schema.parse({"run": {"max_steps": 1}, "monitor": raw}).monitor
    plans = {step: plan_rows(m, step) for step in range(1, 61)}
    rows = [s for s, p in plans.items() if p.layers]
    assert rows == sorted({*range(5, 61, 5), *range(20, 61, 4)})
    assert [s for s, p in plans.items() if "sqnr_db" in p.stats] == list(range(5, 61, 5))
    assert [s for s, p in plans.items() if "amax" in p.stats] == [20, 30, 40, 50, 60]
    assert [s for s, p in plans.items() if "underflow" in p.stats] == [20, 30]
    assert [s for s, p in plans.items() if p.grad_norm] == list(range(20, 61, 4))
    assert [s for s, p in plans.items() if p.update_ratio] == [20, 30, 40, 50, 60]
    assert plans[5].stats == ("sqnr_db",) and not plans[5].update_ratio
    # Without a schedule, every statistic follows monitor's own timing (as before).
    plain = schema.parse({"run": {"max_steps": 1}, "monitor": {"interval": 3}}).monitor
    assert [s for s in range(1, 10) if plan_rows(plain, s).layers] == [3, 6, 9]
    assert plan_rows(plain, 3).stats == tuple(plain.stats)


@pytest.mark.parametrize(
    "monitor, error",
    [
        ({"schedule": {"sqnr": {"interval": 5}}}, r"sqnr: unknown statistic \(known: amax, "),
        ({"schedule": {"rms": {"interval": 5}}}, r"rms: not in monitor\.stats"),
        ({"fidelity": False, "schedule": {"fidelity": {"interval": 5}}}, r"fidelity: monitor\."),
        ({"interval": 0, "schedule": {"amax": {"interval": 5}}}, r"amax: per-layer rows are off"),
        ({"schedule": {"amax": {}}}, r"amax: sets none of interval, start_step, end_step"),
        ({"schedule": {"amax": {"interval": 0}}}, r"amax\.interval: must be >= 1, got 0"),
        ({"start_step": 9, "schedule": {"amax": {"end_step": 5}}}, r"amax: end_step 5 < start"),
        ({"schedule": {"amax": {"every": 5}}}, r"amax\.every: unknown key"),
        ({"schedule": ["amax"]}, r": expected a mapping"),
    ],
)
def test_schedule_errors_name_the_key(monitor, error):
    from lptrain.config.schema import ConfigError, parse

    with pytest.raises(ConfigError, match=rf"^monitor\.schedule\.?{error}"):
        parse({"run": {"max_steps": 1}, "monitor": monitor})


def _rows_of(monitor: dict, steps: int, recipe: str = "fp8-current") -> tuple[list[dict], str]:
    """The per-layer rows of `steps` in-process steps of the nano model (2 blocks, width 64)
    under `monitor`, none of it through the trainer, and the key count line of its start."""
    from types import SimpleNamespace

    import torch

    import lptrain.nn as lpnn
    from lptrain.config import schema
    from lptrain.models.decoder import build_model
    from lptrain.observe.layers import key_count_line
    from lptrain.observe.runner import Monitoring

    raw = {"run": {"max_steps": steps}, "precision": {"recipe": recipe}, "monitor": monitor}
    cfg = schema.parse(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model.__class__(preset="nano"), vocab_size=257, max_seq_len=16)
    lpnn.convert(model, recipe, backend="emulated")
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    mon = Monitoring(cfg, model, 1)

    def step(s, p):
        model(tokens).backward()
        mon.before_update()
        return SimpleNamespace(loss=1.0, skipped=False)

    rows = []
    for i in range(steps):
        row, _ = mon.after_step(i + 1, mon.wrap(step)(None, SimpleNamespace(step=i)))
        rows.append(row)
    return rows, key_count_line(mon.layers, mon.trained, cfg.monitor, mon.shadows)


def test_a_row_holds_the_statistics_due_at_its_step():
    sched = {"sqnr_db": {"interval": 1}, "update_ratio": {"start_step": 4}}
    rows, _ = _rows_of({"interval": 2, "stats": ["amax", "sqnr_db"], "schedule": sched}, 4)
    kinds = [sorted({k.rsplit("/", 1)[1] for k in r if k != "step"}) for r in rows]
    assert kinds == [["sqnr_db"], ["amax", "norm", "sqnr_db"], ["sqnr_db"],
                     ["amax", "norm", "sqnr_db", "update_ratio"]]  # fmt: skip


def test_block_aggregation_reduces_each_block():
    """monitor.aggregate: block on the nano model (2 blocks of 7 layers, lm_head outside):
    a block's value is its worst layer's (lowest SQNR, highest underflow), gradient norms
    combine as the norm of the block's gradients, layers outside blocks keep theirs."""
    import math

    from lptrain.observe.layers import block_key

    monitor = {"interval": 1, "stats": ["sqnr_db", "underflow", "scale"], "shadow": ["mxfp8"]}
    (by_layer,), layer_line = _rows_of(monitor, 1)
    (by_block,), block_line = _rows_of({**monitor, "aggregate": "block"}, 1)
    # 14 layers x (fp8-current: 3 operands (the backward reuses them) x sqnr, underflow, one
    # scale; mxfp8: 6 x sqnr, underflow, scale min and max), 15 trained layers x (norm,
    # update ratio); per block: 2 blocks of the same, and lm_head's 2
    assert len(by_layer) - 1 == 14 * (3 * 3 + 6 * 4) + 15 * 2
    assert len(by_block) - 1 == 2 * (3 * 3 + 6 * 4) + 3 * 2
    assert layer_line == "monitor: 492 per-layer keys per row (layers.jsonl, W&B), 15 layers"
    assert block_line == (
        "monitor: 72 per-block keys per row (layers.jsonl, W&B), 15 layers in 3 blocks "
        "(492 per-layer keys without monitor.aggregate: block)"
    )
    members: dict[str, list[float]] = {}
    for key, value in by_layer.items():
        if key != "step":
            members.setdefault(block_key(key), []).append(value)
    assert set(members) == set(by_block) - {"step"}
    for key, values in members.items():
        stat = key.rsplit("/", 1)[1]
        want = {"sqnr_db": min(values), "scale_min": min(values),
                "norm": math.sqrt(sum(v * v for v in values))}  # fmt: skip
        assert by_block[key] == want.get(stat, max(values)), key
        assert len(values) == (1 if "lm_head" in key else 7), key
    assert by_block["grad/lm_head/norm"] == by_layer["grad/lm_head/norm"]
    assert "shadow/mxfp8/layers.1/grad_weight.input/sqnr_db" in by_block


def test_compact_optimizer_states_log_their_quantization_per_layer(cli, tmp_path):
    """optim.states=fp8: each monitoring row has both moments' SQNR and underflow for every
    trained parameter of the monitored layers, and the count said at start includes them (the
    fp32-states runs above have none: their key sets are exact)."""
    proc = cli("tiny-fp32.yaml", "model.n_layers=1", "run.max_steps=2", "monitor.interval=2",
               "optim.states=fp8", "data.path=embedded:pydoc-topics")  # fmt: skip
    (row,) = _lines(tmp_path / "run" / "layers.jsonl")
    layers = ["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2"]
    stats = [f"{m}_{s}" for m in "mv" for s in ("sqnr_db", "underflow")]
    want = {f"optim/{n}/weight/{s}" for n in [*(f"layers.0.{x}" for x in layers), "lm_head"]
            for s in stats}  # fmt: skip
    assert {k for k in row if k.startswith("optim/")} == want
    # E4M3 with 128-blocks (COAT's expansion for v): about 30-40 dB on this model
    assert all(25 < row[k] < 60 for k in want if k.endswith("sqnr_db"))
    assert all(0 <= row[k] < 0.01 for k in want if k.endswith("underflow"))
    (line,) = [x for x in proc.stderr.splitlines() if "keys per row" in x]
    assert line.startswith(f"monitor: {len(row) - 1} per-layer keys per row")


def test_moment_statistics_need_the_layers_own_parameters_in_the_optimizer():
    """Under DeepSpeed's flat partitions (a wrapper whose CompactAdamW holds other tensors) the
    statistics cannot be per layer: asked for, a one-line error; by default, a reason to say.
    Holding the layer's parameters, every one of them is watched."""
    from types import SimpleNamespace

    import pytest
    import torch

    from lptrain.config import schema
    from lptrain.errors import ConfigError
    from lptrain.observe.runner import _moment_params
    from lptrain.optim import CompactAdamW

    def cfg(**monitor):
        return schema.parse({"run": {"max_steps": 1}, "optim": {"states": "fp8"},
                             "deepspeed": {"zero_stage": 2}, "monitor": monitor})  # fmt: skip

    layer = torch.nn.Linear(4, 4)
    flat = SimpleNamespace(optimizer=CompactAdamW([torch.nn.Parameter(torch.zeros(20))]))
    with pytest.raises(ConfigError, match=r"^monitor.optim_states: .*flat partitions"):
        _moment_params(cfg(optim_states=True), {"lin": layer}, flat)
    opt, moments, why = _moment_params(cfg(), {"lin": layer}, flat)
    assert opt is None and moments == {} and "deepspeed.zero_stage 2" in why
    own = SimpleNamespace(optimizer=CompactAdamW(layer.parameters()))
    opt, moments, why = _moment_params(cfg(), {"lin": layer}, own)
    assert opt is own.optimizer and why is None
    assert moments == {"lin/weight": layer.weight, "lin/bias": layer.bias}
    assert _moment_params(cfg(optim_states=False), {"lin": layer}, own) == (None, {}, None)
