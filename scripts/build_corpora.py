"""Rebuild the embedded corpora (lptrain/corpora/*.jsonl.xz) from the running Python.

    python scripts/build_corpora.py            # prints each snapshot's SHA-256, writes nothing
    python scripts/build_corpora.py --write    # rewrites the snapshots

The shipped snapshots were built from CPython 3.11.7. A different Python gives different
bytes, which is why the data loader reads the snapshots, never the local installation: a new
snapshot is a deliberate change that updates `lptrain/corpora/__init__.py`'s hashes, the
README's main-job numbers, the golden losses and the loss-test constants in one commit.
"""

from __future__ import annotations

import argparse
import lzma
import platform
import sysconfig
from pathlib import Path

from lptrain.corpora import encode_jsonl, sha256

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "lptrain" / "corpora"

# Tests, site-packages and pydoc_data (the fine-tuning domain) stay out of the pretraining
# corpus, as they always have (README, "The fine-tuning data").
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
STDLIB_SKIP.add("pydoc_data")


def stdlib_documents() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return [
        {
            "name": p.relative_to(root).as_posix(),
            "text": p.read_text(encoding="utf-8", errors="replace"),
        }
        for p in files
    ]


def pydoc_topics_documents() -> list[dict]:
    from pydoc_data.topics import topics

    return [{"name": name, "text": topics[name]} for name in sorted(topics)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the snapshots")
    args = ap.parse_args()
    source = f"CPython {platform.python_version()}"
    for stem, docs in (("stdlib", stdlib_documents()), ("pydoc-topics", pydoc_topics_documents())):
        raw = encode_jsonl(docs)
        print(f"{stem}: {len(docs)} documents, {len(raw)} bytes, sha256 {sha256(raw)} ({source})")
        if args.write:
            path = OUT / f"{stem}.jsonl.xz"
            path.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
            print(f"  wrote {path.relative_to(REPO)} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
