"""DeepSpeed glue (distributed/engine.py): the generated config for every shipped recipe, the lr
schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from lptrain.config.schema import load, parse
from lptrain.distributed import engine
from lptrain.models import converters, decoder
from tests.helpers import RECIPES


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
    if path.name.startswith("gpu-"):
        assert cfg.deepspeed.zero_stage in (2, 3) and cfg.deepspeed.dtype == "bf16"
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
