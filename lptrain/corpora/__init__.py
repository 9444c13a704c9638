"""The embedded corpora: fixed snapshots shipped with lptrain, the same bytes on every machine.

`embedded:stdlib` (pretraining: the Python standard library's `.py` sources) and
`embedded:pydoc-topics` (fine-tuning: the language reference's help topics, English prose)
were read from the local Python installation until a different Python changed what a recipe
trained on. They are now snapshots of CPython 3.11.7 (PSF License, LICENSE-PSF.txt beside this
file), built by `scripts/build_corpora.py`, one JSON document per line (`name`, `text`),
xz-compressed.

Each snapshot is identified by the SHA-256 of its uncompressed bytes, checked on every read:
a snapshot that does not match is an error naming the file, never a silently different
corpus. The hash is of the content, not of the .xz container, so a rebuild with another xz
that compresses differently is still the same corpus.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Snapshot:
    name: str  # the `data.path` that selects it
    file: str  # beside this module
    sha256: str  # of the uncompressed JSON lines
    documents: int
    source: str

    @property
    def path(self) -> Path:
        return HERE / self.file


SNAPSHOTS = {
    s.name: s
    for s in (
        Snapshot(
            "embedded:stdlib",
            "stdlib.jsonl.xz",
            "6e9f27e3f256fb0921979aba15a7baf54c00839b98a1cc3dd98834e7b54a0c6b",
            732,
            "CPython 3.11.7 Lib/**/*.py (tests, site-packages and pydoc_data left out)",
        ),
        Snapshot(
            "embedded:pydoc-topics",
            "pydoc-topics.jsonl.xz",
            "1c36532e88818697a8288e78f222fa2cd8f8640de698cb77924fee3c7c9e99f6",
            79,
            "CPython 3.11.7 pydoc_data/topics.py, one document per topic in name order",
        ),
    )
}


class CorpusError(ValueError):
    """A shipped snapshot is missing or is not the bytes its hash names."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_jsonl(docs: list[dict]) -> bytes:
    """The snapshot's uncompressed form: one `{"name", "text"}` object per line, UTF-8."""
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


def read_verified(snapshot: Snapshot) -> bytes:
    """The snapshot's uncompressed bytes, after checking them against its SHA-256."""
    try:
        raw = lzma.decompress(snapshot.path.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise CorpusError(
            f"{snapshot.path}: cannot read the {snapshot.name} snapshot ({exc})"
        ) from None
    got = sha256(raw)
    if got != snapshot.sha256:
        raise CorpusError(
            f"{snapshot.path}: SHA-256 {got[:16]}... is not the {snapshot.name} snapshot "
            f"({snapshot.sha256[:16]}...); reinstall lptrain or restore the file"
        )
    return raw


def documents(name: str) -> Iterator[str]:
    """The texts of the snapshot `name` (`embedded:stdlib` or `embedded:pydoc-topics`), in order."""
    # Split on b"\n" only: JSON escapes it inside strings, but str.splitlines() would also
    # split on U+2028 or U+0085, which JSON leaves as they are.
    for line in read_verified(SNAPSHOTS[name]).split(b"\n")[:-1]:
        yield json.loads(line)["text"]
