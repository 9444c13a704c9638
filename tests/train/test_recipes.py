"""Every shipped recipe parses, validates its precision section and builds its DeepSpeed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from lptrain.train import converters, engine, model
from lptrain.train.config import load

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
# GPU recipes are checked as they would run: 8 CUDA ranks per node.
GPU = engine.DistInfo(rank=0, world=8, local_rank=0, cuda=True)
CPU = engine.DistInfo(rank=0, world=1, local_rank=0, cuda=False)


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    tiny = {f"tiny-{x}.yaml" for x in ("fp32", "bf16", "fp8", "nvfp4", "quartet", "int16-dfp")}
    assert tiny <= names
    assert {n.split("-")[1] for n in names if n.startswith("gpu-")} == {"125m", "1b", "7b"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_builds_deepspeed_config(path: Path):
    cfg = load(path)
    info = GPU if path.name.startswith("gpu-") else CPU
    engine.check_batch(cfg, info)
    ds = engine.deepspeed_config(cfg, info.world)
    assert (
        ds["train_batch_size"] == cfg.deepspeed.micro_batch * cfg.deepspeed.grad_accum * info.world
    )
    assert ds["gradient_clipping"] == cfg.optim.grad_clip  # always explicit (DeepSpeed PR #8068)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert "wandb" not in ds and "scheduler" not in ds
    args = model.model_args(cfg.model, vocab_size=257, max_seq_len=cfg.data.block_size)
    assert args.dim % 32 == 0 and args.ffn_dim % 32 == 0
    converters.resolve_recipe(cfg.precision)
    if path.name.startswith("gpu-"):
        assert cfg.deepspeed.zero_stage in (2, 3) and cfg.deepspeed.dtype == "bf16"
    else:
        assert cfg.deepspeed.dtype != "fp16"


def test_model_presets_sizes():
    sizes = {}
    for name in ("tiny", "125m", "1b", "7b"):
        a = model.model_args(load(RECIPES[0]).model.__class__(preset=name), 32000, 2048)
        emb = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
        kv = a.dim * a.dim // a.n_heads * a.n_kv_heads
        sizes[name] = emb + a.n_layers * (2 * a.dim * a.dim + 2 * kv + 3 * a.dim * a.ffn_dim)
    assert 100e6 < sizes["125m"] < 170e6
    assert 0.9e9 < sizes["1b"] < 1.3e9
    assert 6.0e9 < sizes["7b"] < 7.5e9
    tiny = model.build_model(load(RECIPES[0]).model.__class__(preset="tiny"), 257, 128)
    assert 2e5 < model.count_params(tiny) < 1e6
