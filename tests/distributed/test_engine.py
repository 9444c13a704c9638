"""DeepSpeed glue (distributed/engine.py): the generated config for every shipped recipe, the lr
schedule, CompactAdamW as DeepSpeed's client optimizer (ZeRO-1; bf16-sr at ZeRO-0)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lptrain import safeload
from lptrain.config.schema import load, parse
from lptrain.distributed import engine
from lptrain.models import converters, decoder
from lptrain.optim import STATE_FORMATS
from tests.helpers import RECIPES, REPO, free_port


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = parse(
        {"run": {"max_steps": 100}, "optim": {"lr": 1.0, "warmup_steps": 9, "min_lr_ratio": 0.1}}
    )
    f = engine.lr_lambda(cfg, 100)
    assert [round(f(s), 6) for s in (0, 4, 8)] == [0.1, 0.5, 0.9]
    assert f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(50) > f(60) > f(90)
    lin = engine.lr_lambda(parse({"run": {"max_steps": 10}, "optim": {"decay": "linear"}}), 10)
    assert lin(5) == pytest.approx(0.1 + 0.9 * 0.5)


# GPU recipes are checked as they would run: 8 CUDA ranks per node.
GPU = engine.DistInfo(rank=0, world=8, local_rank=0, cuda=True)


CPU = engine.DistInfo(rank=0, world=1, local_rank=0, cuda=False)


def stand_in_run(root: Path) -> Path:
    """A directory that passes for a finished run (init.from of the fine-tune recipes)."""
    tag = root / "base" / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").touch()
    (tag.parent / "latest").write_text(tag.name)
    return root / "base"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_builds_deepspeed_config(path: Path, tmp_path):
    finetune = path.parent.name in ("finetune", "qat")
    cfg = load(path, [f"init.from={stand_in_run(tmp_path)}"] if finetune else [])
    info = GPU if path.name.startswith("gpu-") else CPU
    engine.check_batch(cfg, info)
    ds = engine.deepspeed_config(cfg, info.world)
    assert (
        ds["train_batch_size"] == cfg.deepspeed.micro_batch * cfg.deepspeed.grad_accum * info.world
    )
    assert ds["gradient_clipping"] == cfg.optim.grad_clip  # always explicit (DeepSpeed PR #8068)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert "wandb" not in ds and "scheduler" not in ds
    args = decoder.model_args(cfg.model, vocab_size=257, max_seq_len=cfg.data.block_size)
    assert args.dim % 32 == 0 and args.ffn_dim % 32 == 0
    converters.resolve_recipe(cfg.precision)
    if path.name.startswith("gpu-"):  # partitioned, or whole where bf16-sr needs ZeRO-0
        stages = (0,) if cfg.optim.master == "bf16-sr" else (2, 3)
        assert cfg.deepspeed.zero_stage in stages and cfg.deepspeed.dtype == "bf16"
    else:
        assert cfg.deepspeed.dtype != "fp16"


def test_quantizer_parameters_get_their_own_group_without_decay():
    import torch

    from lptrain import lora

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16))
    lora.apply(net, lora.AdapterConfig(type="l4q", r=2, bits=4, group_size=16, skip=[]))
    net[1].requires_grad_(True)
    groups = engine.param_groups(net, 0.1)
    assert [g.get("name") for g in groups] == [None, None, "quantizer"]
    assert [len(g["params"]) for g in groups] == [2, 2, 2]  # A, B | norm | step, offset
    assert groups[2]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    frozen = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lora.apply(frozen, lora.AdapterConfig(r=2, skip=[]))
    assert len(engine.param_groups(frozen, 0.1)) == 1  # empty groups are left out


# ---------------------------------------------------------------- CompactAdamW, client optimizer

COMPACT = {
    "int8-block, ZeRO-1": ["optim.states=int8-block", "deepspeed.zero_stage=1"],
    "fp8, ZeRO-3": ["optim.states=fp8", "deepspeed.zero_stage=3"],
    "fp8, bf16-sr, ZeRO-0": ["optim.states=fp8", "optim.master=bf16-sr", "deepspeed.dtype=bf16"],
}


def _steps(e, cfg, batches) -> list[str]:
    out = []
    for b in batches:
        loss = e(b)
        e.backward(loss)
        engine.micro_step(e, engine.manual_nonfinite_check(cfg))
        out.append(float(loss.detach()).hex())
    return out


def _optimizer_file(tag_dir: Path) -> dict:
    zero = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if zero.is_file():  # ZeRO-1/2 and ZeRO-3 name the torch optimizer's part differently
        saved = safeload.load(zero, "t")["optimizer_state_dict"]
        return saved.get("base_optimizer_state") or saved["optimizer_state_dict"]
    return safeload.load(tag_dir / "mp_rank_00_model_states.pt", "t")["optimizer"]


def _train_save_resume(rank: int, port: int, out: str) -> None:
    """3 steps straight saving after the first, then a fresh engine loads it and does steps 2
    and 3 (step 3's loss is the first to see an update made with the restored moments)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    engine._skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    batches = torch.randint(0, 257, (3, 4, 33), generator=torch.Generator().manual_seed(0))
    report = {}
    for name, overrides in COMPACT.items():
        cfg = load(
            REPO / "recipes" / "pretrain" / "tiny-fp32.yaml",
            ["model.preset=nano", "model.n_layers=1", *overrides],
        )
        ds = engine.deepspeed_config(cfg, 1)

        def fresh(cfg=cfg, ds=ds):
            torch.manual_seed(0)
            return engine.initialize(decoder.build_model(cfg.model, 257, 32), cfg, ds, 3)[0]

        ckpt = Path(out) / name.replace(" ", "").replace(",", "_")
        a = fresh()
        straight = _steps(a, cfg, batches[:1])
        a.save_checkpoint(str(ckpt), tag="s1")
        straight += _steps(a, cfg, batches[1:])
        b = fresh()
        b.load_checkpoint(str(ckpt), tag="s1")
        state = _optimizer_file(ckpt / "s1")["state"]
        report[name] = {
            "straight": straight,
            "resumed": _steps(b, cfg, batches[1:]),
            "weights": sorted({str(p.dtype) for p in b.module.parameters()}),
            "stored": sorted({str(v.dtype) for s in state.values() for k, v in s.items()}),
            "bytes": sum(v.nbytes for s in state.values() for k, v in s.items() if k != "step"),
            "elements": sum(s["exp_avg_codes"].numel() for s in state.values()),
            "per_param": STATE_FORMATS[cfg.optim.states].bytes_per_param(),
            "tensors": len(state),
        }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)


def test_compact_adamw_under_deepspeed_resumes_bit_exact_from_compact_states(tmp_path):
    mp.spawn(_train_save_resume, args=(free_port(), str(tmp_path)), nprocs=1)
    report = json.loads((tmp_path / "report.json").read_text())
    for name, r in report.items():
        assert r["resumed"] == r["straight"][1:] and len(r["resumed"]) == 2, name
        # codes and FP32 scales, no float copy of a moment; a tensor's last, partial block
        # pays its whole scales (< 12 bytes over the per-element rate)
        assert r["bytes"] < r["elements"] * r["per_param"] + 12 * r["tensors"], name
    assert report["int8-block, ZeRO-1"]["stored"] == ["torch.float32", "torch.int8", "torch.uint8"]
    assert report["fp8, bf16-sr, ZeRO-0"]["stored"] == ["torch.float32", "torch.uint8"]
    assert report["fp8, bf16-sr, ZeRO-0"]["weights"] == ["torch.bfloat16"]  # no fp32 copy


def test_compact_states_hand_deepspeed_a_client_optimizer_and_bf16_sr_no_bf16_mode():
    plain = engine.deepspeed_config(parse({"run": {"max_steps": 1}}), 1)
    assert plain["optimizer"]["type"] == "AdamW" and "zero_allow_untested_optimizer" not in plain
    compact = parse({"run": {"max_steps": 1}, "optim": {"states": "fp8"}})
    ds = engine.deepspeed_config(compact, 1)
    assert "optimizer" not in ds and ds["zero_allow_untested_optimizer"] is True
    sr = parse(
        {"run": {"max_steps": 1}, "optim": {"master": "bf16-sr"}, "deepspeed": {"dtype": "bf16"}}
    )
    assert engine.deepspeed_config(sr, 1)["bf16"]["enabled"] is False  # no fp32 master copy
    assert engine.manual_nonfinite_check(sr)  # DeepSpeed's fp32 mode checks nothing


def test_a_load_that_re_encoded_old_compact_states_says_so_in_one_line():
    from types import SimpleNamespace

    from lptrain.optim import CompactAdamW

    cfg = parse({"run": {"max_steps": 1}, "optim": {"states": "fp8"}})
    opt = CompactAdamW([torch.nn.Parameter(torch.zeros(4))], states="fp8")
    e = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))  # a ZeRO 1-2 engine's nesting
    assert engine.regrouped_note(e, cfg) is None  # nothing loaded, or loaded as saved
    opt.regrouped = 3  # CompactAdamW.load_state_dict re-encoded (tests/optim/test_reshard.py)
    assert engine.regrouped_note(e, cfg) == (
        "checkpoint: fp8 optimizer states saved with per-slice blocks (lptrain before 507c4ec, "
        "2026-12-07): re-encoded in group-aligned blocks; 3 block(s) changed (requantized from "
        "their saved values)"
    )
    plain = parse({"run": {"max_steps": 1}})
    assert engine.regrouped_note(e, plain) is None  # torch's AdamW: no compact states
