"""Checkpoint manifests (checkpoint/manifest.py): sizes and SHA-256 of every file, written last;
with two ranks the hashing is shared out and both ranks reach the same verdict."""

from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from lptrain.checkpoint import manifest
from tests.helpers import free_port


def _files(d, sizes=(10, 3000, 70_000)):
    d.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        (d / f"f{i}.bin").write_bytes(os.urandom(n))
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "g.bin").write_bytes(b"x" * 5)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    _files(tmp_path)
    written = manifest.write(tmp_path, {"step": 7})
    on_disk = json.loads((tmp_path / manifest.NAME).read_text())
    assert on_disk == written and on_disk["step"] == 7 and on_disk["format"] == manifest.FORMAT
    assert sorted(on_disk["files"]) == ["f0.bin", "f1.bin", "f2.bin", "sub/g.bin"]
    entry = on_disk["files"]["f2.bin"]
    data = (tmp_path / "f2.bin").read_bytes()
    assert entry == {"bytes": 70_000, "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest.problem(tmp_path) == (written, None)
    # A newer format than this lptrain knows is refused, not misread.
    (tmp_path / manifest.NAME).write_text(json.dumps({**on_disk, "format": 99}))
    assert "newer than this lptrain" in manifest.problem(tmp_path)[1]


def _two_ranks(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from pathlib import Path

    d = Path(root)
    if rank == 0:
        _files(d)
    dist.barrier()
    written = manifest.write(d, {"step": 1})
    ok = manifest.problem(d)
    dist.barrier()
    if rank == 1:  # same size, other bytes, in a file only rank 1 hashes: both must say so
        (d / "f1.bin").write_bytes(b"y" * 3000)
    dist.barrier()
    bad = manifest.problem(d)
    Path(out, f"rank{rank}.json").write_text(json.dumps([written, ok[1], bad[1]]))
    dist.destroy_process_group()


def test_two_ranks_share_the_hashing_and_agree(tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    mp.spawn(_two_ranks, args=(free_port(), str(root), str(out)), nprocs=2)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0[0] == r1[0] and r0[0]["files"]["f1.bin"]["bytes"] == 3000
    assert r0[1] is None and r1[1] is None
    assert r0[2] == r1[2] == "f1.bin checksum mismatch"


def test_a_checkpoint_from_before_manifests_can_be_adopted(tmp_path):
    from lptrain.checkpoint import store
    from lptrain.testing import checkpoints as fake

    run = tmp_path / "run"
    tag = fake.save(run / "checkpoints", 4, "run: {seed: 1}\n")
    (tag / manifest.NAME).unlink()  # what a format-1 checkpoint looks like
    (tag / "config.yaml").unlink()
    assert "adopts it" in store.verify(run / "checkpoints", tag.name)[1]
    (run / "config.yaml").write_text("run: {seed: 2}\n")
    assert manifest.main([str(tag)]) == 0
    found, why = store.verify(run / "checkpoints", tag.name)
    assert why is None and found.step == 4 and found.manifest["world_size"] == 1
    assert store.saved_config(found) == "run: {seed: 2}\n"
    assert "has a manifest already" in manifest.adopt(tag)
