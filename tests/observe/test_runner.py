"""Monitoring around the training step (observe/runner.py), end to end."""

from __future__ import annotations

import json


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_monitoring_does_not_change_training(monitored_runs):
    """Per-layer statistics, gradient norms, update ratios, the fidelity probe and the guard
    at every step, against none of it: the loss sequence is bit for bit the same."""
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
    for name in [*layers, "lm_head"]:
        want |= {f"grad/{name}/{k}" for k in ("norm", "cosine", "alignment")}
        want.add(f"weight/{name}/update_ratio")
    assert set(rows[0]) - {"step"} == want
    mxfp8_sqnr = [v for k, v in rows[-1].items() if k.endswith("sqnr_db")]
    assert min(mxfp8_sqnr) > 25  # E4M3 with 32-blocks: about 30 dB on this model
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
