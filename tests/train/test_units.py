"""Small pure pieces: data order, packing through `datasets`, lr schedule, model, overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lptrain.train import data, engine
from lptrain.train.config import ConfigError, DataConfig, ModelConfig, TrainConfig, parse
from lptrain.train.model import build_model


def _samples(layout: data.Layout, src: data.BatchSource, step: int) -> list[tuple]:
    base = step * layout.global_batch
    rows = []
    for m in range(layout.accum):
        rows += [tuple(r.tolist()) for r in src.batch(layout.start(base, m), layout.micro)]
    return rows


def test_global_batch_is_independent_of_rank_and_accumulation_split():
    blocks = np.arange(40 * 5).reshape(40, 5)
    src = data.BatchSource(blocks, np.arange(40), seed=3)
    one = _samples(data.Layout(8, 1, 1, 0), src, step=7)  # crosses an epoch boundary: 56..63
    accum = _samples(data.Layout(4, 2, 1, 0), src, step=7)
    ranks = [row for r in (0, 1) for row in _samples(data.Layout(4, 1, 2, r), src, step=7)]
    assert sorted(one) == sorted(accum) == sorted(ranks)
    assert len(set(ranks[:4]) & set(ranks[4:])) == 0  # ranks see disjoint shards


def test_order_is_a_pure_function_of_seed_and_index():
    blocks = np.arange(30 * 3).reshape(30, 3)
    a = data.BatchSource(blocks, np.arange(30), seed=1)
    b = data.BatchSource(blocks, np.arange(30), seed=1)
    b.batch(100, 7)  # consuming other positions first changes nothing
    assert torch.equal(a.batch(45, 6), b.batch(45, 6))
    assert not torch.equal(a.batch(0, 10), data.BatchSource(blocks, np.arange(30), 2).batch(0, 10))
    epoch = a.batch(0, 30)[:, 0].tolist()
    assert sorted(epoch) == list(range(0, 90, 3))  # each block once per epoch


def test_split_is_disjoint_and_fixed():
    s = data.split(1000, 0.05)
    assert len(s.val) == 50 and len(s.train) == 950
    assert not set(s.val) & set(s.train)
    assert np.array_equal(data.split(1000, 0.05).val, s.val)


def test_local_jsonl_through_datasets_packs_exact_blocks(tmp_path):
    docs = ["a" * 30, "b" * 50, "c" * 19]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(
        path=str(tmp_path / "c.jsonl"), block_size=9, cache_dir=str(tmp_path / "cache")
    )
    blocks = data.load_blocks(cfg, data.byte_tokenizer(), True, lambda: None)
    # 30+50+19 bytes + 3 EOS = 102 tokens -> 10 blocks of 10, remainder dropped.
    assert blocks.shape == (10, 10)
    assert blocks[0].tolist() == [ord("a") + 1] * 10
    assert blocks[3].tolist() == [data.EOS] + [ord("b") + 1] * 9
    assert list((tmp_path / "cache").glob("blocks-*.npy"))  # cached for the next run


def test_embedded_corpus_is_the_stdlib_in_sorted_order():
    files = data.stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    assert files == sorted(files, key=lambda p: p.as_posix())


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


def test_model_linears_are_plain_and_loss_is_near_uniform_at_init():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="nano"), 257, 16)
    kinds = {type(mod) for name, mod in m.named_modules() if name.endswith(("wq", "w1", "lm_head"))}
    assert kinds == {torch.nn.Linear}
    loss = m(torch.randint(0, 257, (2, 17)))
    assert abs(loss.item() - np.log(320)) < 0.2  # vocab padded to 320
    untied = build_model(ModelConfig(preset="nano", tie_embeddings=False), 257, 16)
    assert untied.lm_head.weight is not untied.embed.weight
    assert m.lm_head.weight is m.embed.weight


def test_causal_attention_ignores_the_future():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="nano"), 257, 16).eval()
    x = torch.randint(0, 257, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 257
    assert torch.allclose(m.logits(x)[0, :10], m.logits(y)[0, :10], atol=1e-6)


def test_defaults_parse_and_types_are_strict():
    cfg = parse({"run": {"max_steps": 1}, "optim": {"lr": "1e-3"}})
    assert isinstance(cfg, TrainConfig) and cfg.optim.lr == 1e-3
    with pytest.raises(ConfigError, match=r"^deepspeed.micro_batch: must be >= 1"):
        parse({"run": {"max_steps": 1}, "deepspeed": {"micro_batch": 0}})
