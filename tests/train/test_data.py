"""Corpus, packing, split and batch order (train/data.py)."""

from __future__ import annotations

import json

import numpy as np
import torch

from lptrain.train import data
from lptrain.train.config import DataConfig


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
