"""Corpus -> tokens -> fixed blocks -> a deterministic, rank-sharded, resumable batch order.

Documents are tokenized once and packed into blocks of `block_size + 1` tokens (inputs and
shifted targets share a block); the packed array is cached as `.npy` under a key that hashes
the corpus files, tokenizer and block size. A fixed permutation (independent of the run seed,
so validation loss compares across seeds) holds out `val_fraction` of the blocks.

Batch order is a pure function of (seed, global sample index): sample g of the run is block
`perm_{seed, g // N}[g % N]`. A step consumes `micro * accum * world` consecutive sample indices;
rank r's micro-batch m of step s starts at `s*G + m*micro*world + r*micro`. So the same global
batch is seen whatever the split between ranks and accumulation, and resuming needs only the
sample index.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lptrain import corpora, liblog
from lptrain.config.schema import DataConfig
from lptrain.data import datacheck
from lptrain.errors import ConfigError, first_line

EOS = 0  # byte tokenizer: id 0 separates documents, bytes are 1..256
SPLIT_SEED = 0x5EED  # the train/val split depends on the corpus only


# ---------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    eos: int
    encode: Callable[[str], list[int] | np.ndarray]


def byte_tokenizer() -> Tokenizer:
    def encode(text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8).astype(np.int32) + 1

    return Tokenizer("byte", 257, EOS, encode)


def load_tokenizer(spec: str) -> Tokenizer:
    if spec == "byte":
        return byte_tokenizer()
    package = "tokenizers" if spec.endswith(".json") else "transformers"
    try:
        return _hf_json_tokenizer(spec) if package == "tokenizers" else _hf_auto_tokenizer(spec)
    except ImportError:
        raise ConfigError(
            "data.tokenizer",
            f"{spec} needs the `{package}` package (pip install {package}), or use tokenizer: byte",
        ) from None


# Nothing is downloaded at run time: a tokenizer is a local tokenizer.json or a local
# directory saved by `save_pretrained`, and a missing file is one line naming the path.


def _hf_json_tokenizer(spec: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer  # optional dependency (the hf extra)

    if not Path(spec).is_file():
        raise ConfigError("data.tokenizer", f"{spec}: no such file (a local tokenizer.json)")
    try:
        tok = HFTokenizer.from_file(spec)
    except Exception as exc:  # the Rust side raises a bare Exception for a malformed file
        raise ConfigError("data.tokenizer", f"{spec}: not a tokenizer.json ({exc})") from None
    eos = tok.token_to_id("</s>") or tok.token_to_id("<|endoftext|>") or 0
    return Tokenizer(spec, tok.get_vocab_size(), eos, lambda t: tok.encode(t).ids)


def _hf_auto_tokenizer(spec: str) -> Tokenizer:
    from transformers import AutoTokenizer  # optional dependency (the hf extra)

    if not Path(spec).is_dir():
        raise ConfigError(
            "data.tokenizer",
            f"{spec}: no such directory (give a local directory saved with save_pretrained, a "
            "tokenizer.json file, or byte; nothing is downloaded)",
        )
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "data.tokenizer", f"{spec}: no tokenizer files could be loaded ({first_line(exc)})"
        ) from None
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    return Tokenizer(spec, len(tok), eos, lambda t: tok(t)["input_ids"])


# ---------------------------------------------------------------- documents


# The embedded corpora are snapshots shipped with lptrain (lptrain/corpora), checked against
# their SHA-256 on every read, so a recipe trains on the same bytes whatever Python runs it.
# `embedded:pydoc-topics` (the language reference's prose, what `help()` shows) is the
# fine-tuning domain and is kept out of `embedded:stdlib` (see the README, "Fine-tune").
EMBEDDED = tuple(corpora.SNAPSHOTS)


def _embedded_name(cfg: DataConfig) -> str | None:
    """The snapshot `cfg.path` names (None, the default, is `embedded:stdlib`), or None."""
    if cfg.path is None:
        return "embedded:stdlib"
    if cfg.path.startswith("embedded:"):
        if cfg.path not in EMBEDDED:
            raise ConfigError(
                "data.path", f"unknown embedded corpus {cfg.path!r} (known: {EMBEDDED})"
            )
        return cfg.path
    return None


def _embedded_docs(name: str) -> Iterator[str]:
    try:
        yield from corpora.documents(name)
    except corpora.CorpusError as exc:
        raise ConfigError("data.path", str(exc)) from None


def _local_files(path: str) -> list[Path]:
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and _builder(q) is not None)
    return sorted(Path(q) for q in glob.glob(str(p)))


def _builder(p: Path) -> str | None:
    suffix = p.suffix.lower()
    return {
        ".txt": "text",
        ".md": "text",
        ".py": "text",
        ".jsonl": "json",
        ".json": "json",
        ".parquet": "parquet",
    }.get(suffix)


def _hf_docs(cfg: DataConfig, files: list[Path] | None, cache_dir: Path) -> Iterator[str]:
    import datasets  # optional dependency (the train extra)

    liblog.adopt_library_loggers()  # datasets installs a stderr handler on first use
    datasets.disable_progress_bars()
    if files is None:  # a hub dataset name: read from the local datasets cache, never fetched
        ds = _cached_hub_dataset(datasets, cfg.path, cache_dir / "hf")
    else:
        builders = {_builder(f) for f in files}
        if None in builders or len(builders) != 1:
            raise ConfigError(
                "data.path", "files must all be .txt/.md/.py, .jsonl/.json or .parquet"
            )
        (builder,) = builders
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            with _offline(datasets):
                ds = datasets.load_dataset(
                    builder,
                    data_files=[str(f) for f in files],
                    split="train",
                    cache_dir=str(cache_dir / "hf"),
                    **kwargs,
                )
        except Exception as exc:
            where = datacheck.locate(files, builder, cfg.text_key)
            if where is None:
                raise
            raise ConfigError("data.path", where) from exc
    if cfg.text_key not in ds.column_names:
        raise ConfigError("data.text_key", f"column {cfg.text_key!r} not in {ds.column_names}")
    for batch in ds.select_columns([cfg.text_key]).iter(batch_size=1000):
        for text in batch[cfg.text_key]:
            if not isinstance(text, str):  # null or a number: say where, not AttributeError
                raise _not_text(files, cfg.text_key, text)
            yield text


@contextlib.contextmanager
def _offline(datasets) -> Iterator[None]:
    """`datasets` in offline mode for one call: it reads the flag per call, so nothing it does
    here (a hub name, or a packaged builder's metadata) reaches the network."""
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _cached_hub_dataset(datasets, name: str, cache_dir: Path):
    """A hub dataset already in `cache_dir` (data.cache_dir/hf); never downloaded."""
    try:
        with _offline(datasets):
            return datasets.load_dataset(name, split="train", cache_dir=str(cache_dir))
    except Exception as exc:
        raise ConfigError(
            "data.path",
            f"{name!r} is not a local file or directory, nor a hub dataset cached in {cache_dir} "
            f"(lptrain never downloads at run time: give local .txt/.jsonl/.parquet files) "
            f"({first_line(exc)})",
        ) from None


def _not_text(files: list[Path] | None, key: str, value) -> ConfigError:
    where = datacheck.locate(files, "json", key) if files else None
    if where is not None:
        return ConfigError("data.path", where)
    return ConfigError("data.text_key", f"a {key!r} value is {value!r}, not a string")


# ---------------------------------------------------------------- pack and cache


def _fingerprint(
    cfg: DataConfig, tok: Tokenizer, files: list[Path] | None, embedded: str | None
) -> str:
    source = corpora.SNAPSHOTS[embedded].sha256 if embedded else cfg.path
    h = hashlib.sha256(json.dumps([source, cfg.text_key, tok.name, cfg.block_size, 2]).encode())
    for f in files or []:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def pack(docs: Iterator[str], tok: Tokenizer, block_size: int) -> np.ndarray:
    """Concatenate documents (EOS after each) and cut into (n, block_size + 1) blocks."""
    parts = []
    for text in docs:
        parts.append(np.asarray(tok.encode(text), dtype=np.int32))
        parts.append(np.array([tok.eos], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = len(stream) // (block_size + 1)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    return stream[: n * (block_size + 1)].reshape(n, block_size + 1).astype(dtype)


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.path.expanduser("~/.cache/lptrain"))


def load_blocks(
    cfg: DataConfig, tok: Tokenizer, is_rank0: bool, barrier: Callable[[], None]
) -> np.ndarray:
    """Packed blocks, tokenized by rank 0 once and read from the cache by everyone."""
    embedded = _embedded_name(cfg)
    if embedded is not None:
        files = None
    elif Path(os.path.expanduser(cfg.path)).exists() or any(c in cfg.path for c in "*?["):
        files = _local_files(cfg.path)
        if not files:
            raise ConfigError("data.path", f"no .txt/.jsonl/.parquet files in {cfg.path}")
    else:
        files = None
    root = cache_root(cfg)
    target = root / f"blocks-{_fingerprint(cfg, tok, files, embedded)}.npy"
    if is_rank0 and not target.exists():
        docs = _embedded_docs(embedded) if embedded else _hf_docs(cfg, files, root)
        blocks = pack(docs, tok, cfg.block_size)
        _check_enough(blocks, cfg)  # before caching: a useless result is never cached
        root.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, blocks)
        os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
    barrier()
    blocks = np.load(target, mmap_mode="r")
    _check_enough(blocks, cfg)
    return blocks


def _check_enough(blocks: np.ndarray, cfg: DataConfig) -> None:
    # One training and one validation block at least (split() needs both).
    if len(blocks) < 2:
        raise ConfigError(
            "data.block_size",
            f"{cfg.block_size} is too large for this corpus: it makes {len(blocks)} block(s) of "
            f"{cfg.block_size + 1} tokens and training needs at least 2 (use a smaller "
            "block_size or more data)",
        )


# ---------------------------------------------------------------- split and order


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # block indices
    val: np.ndarray


def split(n_blocks: int, val_fraction: float) -> Split:
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_blocks)
    n_val = max(1, int(round(n_blocks * val_fraction)))
    if n_blocks - n_val < 1:
        raise ConfigError("data.path", f"corpus too small: {n_blocks} blocks")
    return Split(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]))


class BatchSource:
    """Blocks for any (sample index, count): a pure function of the seed, no hidden state."""

    def __init__(self, blocks: np.ndarray, indices: np.ndarray, seed: int):
        self.blocks, self.indices, self.seed = blocks, indices, seed
        self._epoch, self._perm = -1, indices

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, self.indices[rng.permutation(len(self.indices))]
        return self._perm

    def batch(self, start: int, count: int) -> torch.Tensor:
        n = len(self.indices)
        rows = [self._order((start + i) // n)[(start + i) % n] for i in range(count)]
        return torch.from_numpy(np.stack([self.blocks[r] for r in rows]).astype(np.int64))


@dataclass(frozen=True)
class Layout:
    micro: int
    accum: int
    world: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def start(self, sample_base: int, micro_index: int) -> int:
        return sample_base + micro_index * self.micro * self.world + self.rank * self.micro


def val_batches(
    blocks: np.ndarray, rows: np.ndarray, layout: Layout
) -> list[tuple[torch.Tensor, int]]:
    """`rows` (validation block indices) in micro-batches sharded by rank, each block once:
    rank r's batch b holds rows[b*micro*world + r*micro :][:micro]. Pairs (tokens, count).
    Every rank gets the same number of batches, since a forward under ZeRO-3 is collective:
    a rank past the end of `rows` runs rows[:1] with count 0 (it weighs nothing)."""
    step = layout.micro * layout.world
    out = []
    for b in range(-(-len(rows) // step)):  # ceil: the last batches may be short
        idx = rows[b * step + layout.rank * layout.micro :][: layout.micro]
        count = len(idx)
        idx = idx if count else rows[:1]
        out.append((torch.from_numpy(np.stack([blocks[r] for r in idx]).astype(np.int64)), count))
    return out


def mean_loss(forward: Callable, batches, reduce: Callable = lambda v: v) -> float:
    """The validation loss, the one implementation behind the training log's `val_loss` and
    `lptrain eval`: each batch's mean next-token loss `forward(tokens)` weighted by its block
    count (blocks have one length, so this is the mean over tokens), every block once.
    `reduce` sums [total, count] over ranks."""
    total = count = 0.0
    for tokens, n in batches:
        loss = float(forward(tokens))
        if n:  # a rank's padding batch keeps the ranks in step and adds nothing (not even NaN)
            total += loss * n
            count += n
    total, count = reduce([total, count])
    return total / count
