"""Checkpoint manifests: every file of a checkpoint with its size and SHA-256, written last.

A checkpoint is trusted only when its `manifest.json` verifies: the manifest is written after
every rank's files are complete and before the directory is renamed into place and `latest`
moves, so a checkpoint cut short by a kill, a full disk or a truncated copy never verifies.

Hashing is shared out over the ranks (rank r hashes files r, r + world, ...), so a large
sharded checkpoint is hashed in parallel; every rank returns the same verdict. The manifest
also records what a resume must match (world size, ZeRO stage) and is the place for later
format additions (e.g. a universal-checkpoint layout): readers ignore keys they do not know.

`python -m lptrain.checkpoint.manifest RUN/checkpoints/stepNNNNNNNN` adopts a checkpoint written
before manifests existed (the user vouches that it is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

NAME = "manifest.json"
FORMAT = 2  # 1: lptrain before manifests (not trusted: nothing to verify against)
_CHUNK = 1 << 20


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_all(value) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def _listing(tag_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != NAME
    )


def _my_share(names: list[str]) -> list[str]:
    rank, world = _world()
    return names[rank::world]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, flushed to disk, then renamed."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write(tag_dir: Path, meta: dict) -> dict:
    """Collective: hash every file under `tag_dir`; rank 0 writes the manifest. Returns it."""
    names = from_rank0(_listing(tag_dir) if _world()[0] == 0 else None)
    mine = {n: _entry(tag_dir / n) for n in _my_share(names)}
    files = {k: v for part in _from_all(mine) for k, v in part.items()}
    manifest = {"format": FORMAT, **meta, "files": {n: files[n] for n in names}}
    if _world()[0] == 0:
        write_atomic(tag_dir / NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_local(tag_dir: Path, meta: dict) -> dict:
    """`write` by this process alone (no collectives): for what one rank makes by itself,
    such as the universal copy of a checkpoint or an export."""
    files = {n: _entry(tag_dir / n) for n in _listing(tag_dir)}
    manifest = {"format": FORMAT, **meta, "files": files}
    write_atomic(tag_dir / NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def problem_local(tag_dir: Path) -> tuple[dict | None, str | None]:
    """`problem` by this process alone (no collectives): every file fully checked here."""
    manifest, why = read(tag_dir)
    if why is not None:
        return None, why
    for name, entry in manifest["files"].items():
        why = _check_file(tag_dir, name, entry, full=True)
        if why is not None:
            return None, why
    return manifest, None


def read(tag_dir: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, why it cannot be read). Local, no collectives."""
    path = tag_dir / NAME
    if not tag_dir.is_dir():
        return None, "missing"
    if not path.is_file():
        return None, (
            f"no {NAME}: an unfinished save, or one from before lptrain checked saves "
            "(python -m lptrain.checkpoint.manifest TAG_DIR adopts it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{NAME} unreadable ({type(exc).__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"{NAME} malformed"
    if manifest.get("format", 0) > FORMAT:
        return None, f"{NAME} format {manifest['format']} is newer than this lptrain ({FORMAT})"
    return manifest, None


def _check_file(tag_dir: Path, name: str, entry: dict, full: bool) -> str | None:
    path = tag_dir / name
    if not path.is_file():
        return f"{name} missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{name} is {size} bytes, the manifest says {entry.get('bytes')}"
    if full and sha256(path) != entry.get("sha256"):
        return f"{name} checksum mismatch"
    return None


def problem(tag_dir: Path) -> tuple[dict | None, str | None]:
    """Collective: (manifest, None) when every listed file has its size and checksum, else
    (None, the first problem). Sizes are checked by every rank, checksums shared out."""
    manifest, why = from_rank0(read(tag_dir) if _world()[0] == 0 else None)
    if why is not None:
        return None, why
    names = list(manifest["files"])
    share = set(_my_share(names))
    mine = None
    for name in names:  # the first problem in file order, identical on every rank
        mine = _check_file(tag_dir, name, manifest["files"][name], full=name in share)
        if mine is not None:
            break
    found = [p for p in _from_all(mine) if p is not None]
    if found:
        order = {n: i for i, n in enumerate(names)}
        return None, min(found, key=lambda p: order.get(p.split(" ", 1)[0], len(order)))
    return manifest, None


def adopt(tag_dir: Path) -> str:
    """Vouch for a checkpoint saved before lptrain wrote manifests: record its files as they
    are now (and the run's config.yaml, which such checkpoints lack). Returns what was done."""
    if not (tag_dir.name.startswith("step") and tag_dir.name[4:].isdigit()):
        return f"{tag_dir}: not a checkpoint tag directory (stepNNNNNNNN)"
    if (tag_dir / NAME).exists():
        return f"{tag_dir}: has a manifest already"
    config = tag_dir / "config.yaml"
    run_config = tag_dir.parent.parent / "config.yaml"
    if not config.exists():
        if not run_config.exists():
            return f"{tag_dir}: no config.yaml here or in the run directory; not adopted"
        config.write_text(run_config.read_text())
    ranks = len(list(tag_dir.glob("lptrain_rank*.pt")))
    step = int(tag_dir.name[4:])
    write(tag_dir, {"tag": tag_dir.name, "step": step, "world_size": ranks, "adopted": True})
    return f"{tag_dir}: manifest written ({ranks} rank(s), step {step})"


def main(argv: list[str] | None = None) -> int:
    """`python -m lptrain.checkpoint.manifest RUN/checkpoints/stepNNNNNNNN ...`"""

    dirs = sys.argv[1:] if argv is None else argv
    if not dirs:
        print(
            "usage: python -m lptrain.checkpoint.manifest CHECKPOINT_TAG_DIR ...", file=sys.stderr
        )
        return 2
    for d in dirs:
        print(adopt(Path(d)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
