"""The base a fine-tuning run starts from (`init.from`): resolved once, recorded, and carried.

At a fresh start `resolve` turns `init.from` into an absolute path (for an lptrain run, the
newest checkpoint of it that verifies: store.verify) and a content hash: the SHA-256 of the
checkpoint's manifest (which holds every file's SHA-256), or of a Hugging Face directory's
files. The run's config.yaml then holds that absolute path.

`write_copy` keeps what a reader needs from the base, without its weights, in `RUN/base/`:
`base.json` (spec, path, kind, hash) and, for a Hugging Face base, its `config.json` and
tokenizer files; for an lptrain base, its config.yaml. Every checkpoint carries a copy
(store.save), so a run, its checkpoints and its exports are evaluated, exported and resumed
after the base is moved or deleted: the checkpoint holds every weight.

On a resume `for_resume` compares the recipe's `init.from` with the record: the same content
(wherever it now is) resumes; other content is refused unless `--allow-change init.from`; a
base that is gone is not needed, and a note says which base the run started from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch.distributed as dist

from lptrain.checkpoint import manifest, store
from lptrain.config.init_source import KEY, Source, locate
from lptrain.errors import ConfigError
from lptrain.models.hf import EXTRA_TOKENIZER_FILES, TOKENIZER_FILES

DIR = "base"  # in a run directory and in every checkpoint
RECORD = "base.json"
_HF_CONFIG = ("config.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Base:
    source: Source  # what the init converter and the tokenizer read
    record: dict  # spec, path, kind, tag, sha256
    notes: tuple[str, ...] = ()


def _hash_files(root: Path) -> str:
    """SHA-256 over the (name, SHA-256) of every regular file under `root`, sorted by name."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{manifest.sha256(p)}\n".encode())
    return h.hexdigest()


def content_hash(src: Source) -> str:
    if src.kind == "lptrain":
        return manifest.sha256(src.ckpt_dir / src.tag / manifest.NAME)
    return _hash_files(src.path)


def _verified(src: Source, spec: str) -> tuple[Source, list[str]]:
    """The checkpoint of an lptrain base that verifies (store.pick: the tag `spec` names, or
    the newest of its checkpoints that does, with a note when newer ones did not)."""
    if src.kind != "lptrain":
        return src, []
    found, rejected = store.pick(Path(spec).expanduser(), KEY)
    notes = []
    if rejected:
        notes.append(f"init: using {found.tag} of {spec}, the newest that verifies "
                     f"({store.reasons(rejected)})")  # fmt: skip
    return dataclasses.replace(src, path=found.path, ckpt_dir=found.ckpt_dir, tag=found.tag), notes


def resolve(spec: str) -> Base:
    """A fresh start's base: located, verified, made absolute and hashed."""
    src, notes = _verified(locate(spec), spec)
    src = _absolute(src)
    path = src.ckpt_dir / src.tag if src.kind == "lptrain" else src.path
    sha = manifest.from_rank0(content_hash(src) if _rank0() else None)  # read once, not per rank
    record = {"spec": str(spec), "path": str(path), "kind": src.kind, "tag": src.tag,
              "sha256": sha}  # fmt: skip
    return Base(src, record, tuple(notes))


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _absolute(src: Source) -> Source:
    fix = lambda p: p.resolve() if p is not None else None  # noqa: E731
    return dataclasses.replace(
        src, path=fix(src.path), ckpt_dir=fix(src.ckpt_dir), run_dir=fix(src.run_dir)
    )


def write_copy(dest: Path, base: Base) -> None:
    """`dest/` (RUN/base): base.json and the base's small files a reader needs (no weights)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = base.source
    if src.config_only:  # a resume without the base: the checkpoint's copy, as it is
        shutil.copytree(src.path, tmp, dirs_exist_ok=True)
    elif src.kind == "hf":
        for name in (*_HF_CONFIG, *TOKENIZER_FILES, *EXTRA_TOKENIZER_FILES):
            if (src.path / name).is_file():
                shutil.copy2(src.path / name, tmp / name)
    else:
        config = src.ckpt_dir / src.tag / store.CONFIG
        shutil.copy2(config, tmp / "config.yaml")
    (tmp / RECORD).write_text(json.dumps(base.record, indent=1) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def read_copy(where: Path, key: str) -> Base | None:
    """The base recorded in `where/base/` (a checkpoint or a run directory); None if there is
    none (a run without init.from, or from before base records); ConfigError(key, ...) for a
    record that is there but malformed. Its Source reads the copy: the architecture and the
    tokenizer, never weights."""
    d = where / DIR
    if not (d / RECORD).exists():
        return None
    try:
        record = json.loads((d / RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{d / RECORD}: unreadable ({type(exc).__name__})") from None
    ok = isinstance(record, dict) and record.get("kind") in ("hf", "lptrain")
    if not ok or not all(isinstance(record.get(k), str) for k in ("path", "sha256")):
        raise ConfigError(key, f"{d / RECORD}: malformed (needs kind hf|lptrain, path, sha256)")
    if record["kind"] == "hf":
        return Base(Source("hf", d, config_only=True), record)
    return Base(Source("lptrain", d, run_dir=d, config_only=True), record)


def for_resume(spec: str | None, found: store.Found, allow_change: bool) -> Base | None:
    """The base of a resume from `found`: the recorded one; the recipe's `init.from` must be the
    same content unless the change is allowed. None for a run without a base."""
    saved = read_copy(found.path, "checkpoint.resume")
    if saved is None:  # a run without init.from, or a checkpoint from before base records
        return resolve(spec) if spec is not None else None
    rec = saved.record
    was = f"{rec['path']} (sha256 {rec['sha256'][:12]})"
    if spec is None:
        return saved
    try:
        now = resolve(spec)
    except ConfigError:
        note = (f"init: {spec} is not readable from here; not needed: {found.tag} holds every "
                f"weight (this run started from {was})")  # fmt: skip
        return dataclasses.replace(saved, notes=(note,))
    if now.record["sha256"] == rec["sha256"]:
        return dataclasses.replace(now, record=rec)
    if not allow_change:
        raise ConfigError(
            KEY,
            f"{spec} (sha256 {now.record['sha256'][:12]}) is not the base this run started "
            f"from: {was}; give that base, or --allow-change init.from (the checkpoint holds "
            "the trained weights either way)",
        )
    note = f"init: {spec} differs from the base this run started from, {was} (allowed)"
    return dataclasses.replace(saved, notes=(note,))
