"""ZeRO-3 model construction inside `deepspeed.zero.Init` (distributed/engine.py `zero_init`,
`model_construction`): a ~10M-parameter model's parameters are created partitioned, its
initialization equals the whole-model build bit for bit, and lptrain's conversion and quantizer
buffers work on the partitioned model.

Training under zero.Init is tested end to end by test_launch.py's ZeRO-3 cases (tiny model,
fp32 and fp8, 2 ranks against the 1-process whole-model run, within 1e-5 / 2%): zero.Init is on
by default under ZeRO-3. Measured while writing this: 2-rank ZeRO-3 curves with and without
zero.Init were bit for bit equal (nano: fp32, fp8, bf16) and within 1e-5 (this ~10M model, fp8).
"""

from __future__ import annotations

import json
import os

import torch
import torch.multiprocessing as mp

from lptrain.config.schema import TrainConfig, load
from lptrain.distributed import engine
from tests.helpers import REPO, free_port

# ~10M parameters: 6 layers of width 384 (10.6M in the blocks) and a byte vocabulary.
MODEL_10M = ["model.preset=small", "model.dim=384", "model.n_layers=6", "model.n_heads=6",
             "model.n_kv_heads=6", "model.ffn_dim=1024"]  # fmt: skip


def _cfg(*overrides: str) -> TrainConfig:
    return load(REPO / "recipes" / "pretrain" / "tiny-fp8.yaml", list(overrides))


def test_zero_init_only_under_zero3_and_without_whole_weight_converters():
    on = _cfg("deepspeed.zero_stage=3")
    assert engine.zero_init(on, ["precision"]) == (True, engine.zero_init(on, [])[1])
    assert engine.zero_init(_cfg("deepspeed.zero_stage=2"), ["precision"]) == (False, "")
    assert engine.zero_init(_cfg("deepspeed.zero_stage=3", "deepspeed.zero_init=false"), []) == (
        False,
        "",
    )
    used, why = engine.zero_init(on, ["init", "precision"])
    assert not used and "init converter needs whole weights" in why


def _build_two_ways(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import deepspeed

    import lptrain.nn as lpnn
    from lptrain.models.decoder import build_model

    engine._skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _cfg("deepspeed.zero_stage=3", *MODEL_10M)
    ds = engine.deepspeed_config(cfg, 2)
    torch.manual_seed(0)
    whole = build_model(cfg.model, 256, 64)
    torch.manual_seed(0)
    part = build_model(cfg.model, 256, 64, engine.model_construction(ds, True))
    for model in (whole, part):
        lpnn.convert(model, "fp8-delayed", skip=("lm_head",), log_fn=lambda _: None)
    report = {"partitioned": [], "equal": [], "buffers": []}
    for (name, w), (_, p) in zip(whole.named_parameters(), part.named_parameters(), strict=True):
        report["partitioned"].append([name, p.numel(), p.ds_numel, p.ds_tensor.numel(), w.numel()])
        with deepspeed.zero.GatheredParameters([p]):
            report["equal"].append([name, torch.equal(p.data, w.data)])
    report["rope"] = torch.equal(part.rope_cos, whole.rope_cos) and part.rope_cos.dtype == (
        torch.float32
    )
    pairs = zip(lpnn.quantized_layers(whole), lpnn.quantized_layers(part), strict=True)
    for (_, ref), (_, layer) in pairs:
        theirs = ref.state_dict()
        for key, b in layer.state_dict().items():
            if not key.endswith("weight"):  # buffers: quantizer state, seeds, signs
                same = b.dtype == theirs[key].dtype and torch.equal(b, theirs[key])
                report["buffers"].append([key, same])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def test_parameters_are_created_partitioned_and_initialized_as_the_whole_model(tmp_path):
    mp.spawn(_build_two_ways, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, numel, ds_numel, shard, full in r["partitioned"]:
            assert numel == 0 and ds_numel == full, name  # no rank holds the whole tensor
            assert shard == -(-full // 2), name  # half of it, padded
        assert all(eq for _, eq in r["equal"]), r["equal"]
        assert r["rope"]
        # Quantizer state is made after construction: the whole build's dtypes and values.
        assert r["buffers"] and all(same for _, same in r["buffers"]), r["buffers"]
