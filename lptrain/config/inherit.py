"""What a fine-tuning run takes from its `init.from` base: the base run's config, its tokenizer."""

from __future__ import annotations

from lptrain.config import schema
from lptrain.config.init_source import Source, locate
from lptrain.errors import ConfigError

# What makes a Hugging Face directory's tokenizer loadable by AutoTokenizer (dataset.py).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def base_config(src: Source):
    """The base run's TrainConfig (None when the checkpoint has no run directory)."""
    if src.kind != "lptrain" or src.run_dir is None:
        return None
    return schema.load(src.run_dir / "config.yaml")


def tokenizer_spec(cfg, src: Source | None = None) -> str:
    """The tokenizer of a run: `data.tokenizer` when set; unset (null, only with `init.from`:
    schema.parse makes it `byte` otherwise), the base's: an lptrain run's data.tokenizer, or a
    Hugging Face directory's own tokenizer. A Hugging Face directory that ships none is
    refused: its ids would silently be lptrain's byte ids, whatever the model's vocabulary, so
    that must be asked for (`data.tokenizer: byte`). `src`: the base as already located (or
    the run's copy of it, checkpoint/base.py); by default `init.from` is located here."""
    spec = cfg.data.tokenizer
    if spec is not None:
        return spec
    src = src if src is not None else locate(cfg.init.from_)
    if src.kind == "hf":
        if any((src.path / f).is_file() for f in HF_TOKENIZER_FILES):
            return str(src.path)
        raise ConfigError(
            "data.tokenizer",
            f"the model at {cfg.init.from_} ships no tokenizer ({' or '.join(HF_TOKENIZER_FILES)}):"
            " set data.tokenizer to its tokenizer (a tokenizer.json or a save_pretrained "
            "directory), or to byte to train it on lptrain's byte tokenizer (257 ids)",
        )
    base = base_config(src)
    if base is None:  # a checkpoint without its run directory: lptrain's default
        return "byte"
    # The base's own choice; unset there too (a fine-tune of a fine-tune): its base's.
    return tokenizer_spec(base)
