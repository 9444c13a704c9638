"""What a fine-tuning run takes from its `init.from` base: the base run's config, its tokenizer."""

from __future__ import annotations

from lptrain.config import schema
from lptrain.config.init_source import Source, locate


def base_config(src: Source):
    """The base run's TrainConfig (None when the checkpoint has no run directory)."""
    if src.kind != "lptrain" or src.run_dir is None:
        return None
    return schema.load(src.run_dir / "config.yaml")


def tokenizer_spec(cfg, src: Source | None = None) -> str:
    """The tokenizer of a fine-tuning run: `data.tokenizer` when set to anything but the
    default `byte`; otherwise the base's (an lptrain run's data.tokenizer, or a Hugging Face
    directory's own tokenizer when it ships one). `src`: the base as already located (or the
    run's copy of it, checkpoint/base.py); by default `init.from` is located here."""
    spec = cfg.data.tokenizer
    if spec != "byte" or cfg.init.from_ is None:
        return spec
    src = src if src is not None else locate(cfg.init.from_)
    if src.kind == "hf":
        has_tok = any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return str(src.path) if has_tok else spec
    base = base_config(src)
    return base.data.tokenizer if base is not None else spec
