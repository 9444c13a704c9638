"""Corpus, packing, split and batch order (data/dataset.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lptrain import corpora
from lptrain.config.schema import ConfigError, DataConfig
from lptrain.data import dataset


def _samples(layout: dataset.Layout, src: dataset.BatchSource, step: int) -> list[tuple]:
    base = step * layout.global_batch
    rows = []
    for m in range(layout.accum):
        rows += [tuple(r.tolist()) for r in src.batch(layout.start(base, m), layout.micro)]
    return rows


def test_global_batch_is_independent_of_rank_and_accumulation_split():
    blocks = np.arange(40 * 5).reshape(40, 5)
    src = dataset.BatchSource(blocks, np.arange(40), seed=3)
    one = _samples(dataset.Layout(8, 1, 1, 0), src, step=7)  # crosses an epoch boundary: 56..63
    accum = _samples(dataset.Layout(4, 2, 1, 0), src, step=7)
    ranks = [row for r in (0, 1) for row in _samples(dataset.Layout(4, 1, 2, r), src, step=7)]
    assert sorted(one) == sorted(accum) == sorted(ranks)
    assert len(set(ranks[:4]) & set(ranks[4:])) == 0  # ranks see disjoint shards


def test_order_is_a_pure_function_of_seed_and_index():
    blocks = np.arange(30 * 3).reshape(30, 3)
    a = dataset.BatchSource(blocks, np.arange(30), seed=1)
    b = dataset.BatchSource(blocks, np.arange(30), seed=1)
    b.batch(100, 7)  # consuming other positions first changes nothing
    assert torch.equal(a.batch(45, 6), b.batch(45, 6))
    assert not torch.equal(
        a.batch(0, 10), dataset.BatchSource(blocks, np.arange(30), 2).batch(0, 10)
    )
    epoch = a.batch(0, 30)[:, 0].tolist()
    assert sorted(epoch) == list(range(0, 90, 3))  # each block once per epoch


def test_split_is_disjoint_and_fixed():
    s = dataset.split(1000, 0.05)
    assert len(s.val) == 50 and len(s.train) == 950
    assert not set(s.val) & set(s.train)
    assert np.array_equal(dataset.split(1000, 0.05).val, s.val)


def test_local_jsonl_through_datasets_packs_exact_blocks(tmp_path):
    docs = ["a" * 30, "b" * 50, "c" * 19]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(
        path=str(tmp_path / "c.jsonl"), block_size=9, cache_dir=str(tmp_path / "cache")
    )
    blocks = dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)
    # 30+50+19 bytes + 3 EOS = 102 tokens -> 10 blocks of 10, remainder dropped.
    assert blocks.shape == (10, 10)
    assert blocks[0].tolist() == [ord("a") + 1] * 10
    assert blocks[3].tolist() == [dataset.EOS] + [ord("b") + 1] * 9
    assert list((tmp_path / "cache").glob("blocks-*.npy"))  # cached for the next run


def test_embedded_corpora_are_the_shipped_snapshots():
    """The same bytes whatever Python runs lptrain: the snapshots, checked by content hash."""
    for name, snap in corpora.SNAPSHOTS.items():
        raw = corpora.read_verified(snap)
        assert corpora.sha256(raw) == snap.sha256
        docs = [json.loads(line) for line in raw.split(b"\n")[:-1]]
        assert len(docs) == snap.documents == len(list(corpora.documents(name)))
        names = [d["name"] for d in docs]
        assert names == sorted(names)
    stdlib = [
        json.loads(x)["name"]
        for x in corpora.read_verified(corpora.SNAPSHOTS["embedded:stdlib"]).split(b"\n")[:-1]
    ]
    assert all(n.endswith(".py") for n in stdlib)
    assert not any(part in n.split("/")[:-1] for n in stdlib for part in ("test", "pydoc_data"))


def test_embedded_corpus_does_not_read_the_local_python(tmp_path, monkeypatch):
    # A different standard library (here: none) must not change what the default corpus is.
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(tmp_path)})
    cfg = DataConfig(path=None, block_size=128, cache_dir=str(tmp_path / "cache"))
    blocks = dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)
    assert blocks.shape == (88080, 129)  # CPython 3.11.7's Lib/, byte tokens
    text = next(corpora.documents("embedded:stdlib"))
    assert blocks[0, : min(len(text), 129)].tolist() == [b + 1 for b in text.encode()[:129]]


def test_a_damaged_snapshot_is_one_error_naming_the_file(tmp_path, monkeypatch):
    import lzma

    snap = corpora.SNAPSHOTS["embedded:pydoc-topics"]
    bad = tmp_path / snap.file
    raw = lzma.decompress(snap.path.read_bytes())
    bad.write_bytes(lzma.compress(raw.replace(b"the", b"teh", 1)))
    monkeypatch.setattr(corpora, "HERE", tmp_path)
    cfg = DataConfig(path=snap.name, block_size=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as exc:
        dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)
    assert exc.value.path == "data.path"
    assert exc.value.problem.startswith(f"{bad}: SHA-256 ")
    assert "is not the embedded:pydoc-topics snapshot" in exc.value.problem
    assert not list((tmp_path / "cache").glob("blocks-*.npy"))  # nothing cached


def test_unknown_embedded_corpus_names_the_known_ones(tmp_path):
    cfg = DataConfig(path="embedded:wiki", block_size=16, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown embedded corpus 'embedded:wiki'"):
        dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)


# ---------------------------------------------------------------- local only: nothing downloaded


def test_a_tokenizer_that_is_not_a_local_path_is_one_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        dataset.load_tokenizer("gpt2")
    assert exc.value.path == "data.tokenizer"
    assert exc.value.problem.startswith("gpt2: no such directory")
    with pytest.raises(ConfigError, match="no such file"):
        dataset.load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_a_directory_without_tokenizer_files_is_one_error(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as exc:
        dataset.load_tokenizer(str(tmp_path))
    assert exc.value.problem.startswith(f"{tmp_path}: no tokenizer files could be loaded")
    assert "\n" not in exc.value.problem


def test_a_hub_dataset_name_is_read_from_the_cache_only(tmp_path):
    # Nothing is cached, so offline mode must fail at once (a network attempt would hang or
    # say something else); the message says lptrain never downloads.
    cfg = DataConfig(path="someone/some-dataset", block_size=16, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)
    assert exc.value.path == "data.path"
    assert "never downloads" in exc.value.problem and "\n" not in exc.value.problem


# ---------------------------------------------------------------- bad data: file and line


BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(0x80, 0x100))
BAD = {
    # name: (file name, content, expected message after "<file>:")
    "binary .txt": ("c.txt", b"fine\nstill fine\n" + BINARY, "3: not UTF-8 text (byte 0x80)"),
    "malformed JSONL line": (
        "c.jsonl",
        b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n',
        "2: malformed JSON (Expecting ',' delimiter at column 13)",
    ),
    "null text": ("c.jsonl", b'{"text": "a"}\n{"text": null}\n', "2: 'text' is null, not a string"),
    "number text": ("c.jsonl", b'{"text": "a"}\n{"text": 5}\n', "2: 'text' is int 5, not a string"),
    "missing key": ("c.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "2: no 'text' field"),
}


@pytest.mark.parametrize("name,content,message", BAD.values(), ids=list(BAD))
def test_bad_corpus_file_is_one_error_with_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    cfg = DataConfig(path=str(tmp_path / name), block_size=4, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as exc:
        dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)
    assert exc.value.path == "data.path"
    assert exc.value.problem.startswith(f"{tmp_path / name}:{message}"), exc.value.problem
    assert not list((tmp_path / "cache").glob("blocks-*.npy"))  # nothing cached


def test_block_size_larger_than_the_corpus_names_block_size(tmp_path):
    (tmp_path / "c.txt").write_text("x" * 300)
    cfg = DataConfig(path=str(tmp_path / "c.txt"), block_size=200, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError) as exc:
        dataset.load_blocks(cfg, dataset.byte_tokenizer(), True, lambda: None)
    assert exc.value.path == "data.block_size"
    assert exc.value.problem.startswith("200 is too large for this corpus: it makes 1 block(s)")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_batches_read_each_block_once_on_any_number_of_ranks(world):
    """10 validation blocks in micro-batches of 4: each block once over all ranks (it used to
    wrap to a full batch and count blocks twice), every rank the same number of forwards
    (ZeRO-3), and mean_loss the block-weighted mean whatever the split."""
    blocks = np.arange(20 * 3).reshape(20, 3)  # block i holds 3i, 3i+1, 3i+2
    rows = np.arange(3, 13)
    per_rank = [
        dataset.val_batches(blocks, rows, dataset.Layout(4, 1, world, r)) for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1
    seen = [int(t[i, 0]) // 3 for b in per_rank for t, n in b for i in range(n)]
    assert sorted(seen) == list(range(3, 13))

    def forward(t):  # a stand-in for the model's loss: the batch's mean first token
        return t[:, 0].double().mean()

    sums = []  # each rank's [total, count], as the all-reduce receives them
    for b in per_rank:
        dataset.mean_loss(forward, b, lambda v: sums.append(v) or [1.0, 1.0])
    total, count = np.sum(sums, axis=0)
    assert count == 10 and total / count == 3 * 7.5  # blocks 3..12, each once
