"""What makes an export load alone: its own copy of the tokenizer, and a config that points at
nothing outside it.

A run's config may name its base (`init.from: runs/base`, relative to where it was trained) and
its tokenizer may be the base's (a Hugging Face directory, an absolute path). An export copies
the tokenizer files into `tokenizer/` and records the spec relative to the export; loading
reads the config without the sections the fold has already baked into the weights (`init`,
`qat`, `bitswitch`, `adapters`), so the base and the run may be gone, and the export may be
read from any working directory or another machine.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

from lptrain.config import schema
from lptrain.config.schema import TrainConfig
from lptrain.data import dataset
from lptrain.errors import ConfigError
from lptrain.models.hf import EXTRA_TOKENIZER_FILES, TOKENIZER_FILES

TOKENIZER_DIR = "tokenizer"
# The fold bakes these into the exported layers: the export's model is built without them.
FOLDED_SECTIONS = ("init", "qat", "bitswitch", "adapters")
# Encoded by the original and the copied tokenizer: the copy must give the same ids.
_PROBE = "def main():\n    return 'héllo, wörld' + str(42)  # tokens, ünïcode, spaces\n"


def tokenizer_files(spec: str) -> list[Path]:
    """The files of tokenizer `spec` (a tokenizer.json or a save_pretrained directory)."""
    src = Path(spec)
    if src.is_file():
        return [src]
    files = [src / f for f in (*TOKENIZER_FILES, *EXTRA_TOKENIZER_FILES) if (src / f).is_file()]
    if not files:
        raise ConfigError("data.tokenizer", f"{spec}: no tokenizer files to copy")
    return files


def copy_tokenizer(spec: str, tok: dataset.Tokenizer, dest: Path, sub: str = TOKENIZER_DIR) -> str:
    """Copy tokenizer `spec` (loaded as `tok`) into `dest/sub`; the spec relative to `dest`
    (`byte` needs no files). The copy is loaded back and must encode exactly as `tok` does."""
    if spec == "byte":
        return "byte"
    out = dest / sub if sub else dest
    out.mkdir(parents=True, exist_ok=True)
    files = tokenizer_files(spec)
    if Path(spec).is_file():  # a tokenizer.json, whatever its name: load_tokenizer needs .json
        shutil.copy2(files[0], out / "tokenizer.json")
        rel = f"{sub}/tokenizer.json" if sub else "tokenizer.json"
    else:
        for f in files:
            shutil.copy2(f, out / f.name)
        rel = sub or "."
    _check_copy(spec, tok, dataset.load_tokenizer(str(dest / rel)))
    return rel


def copy_hf_tokenizer(tok: dataset.Tokenizer, dest: Path) -> None:
    """The run's tokenizer, wherever it is (the base's directory, or a tokenizer.json), into
    the Hugging Face directory `dest`, where `transformers`' AutoTokenizer finds it."""
    if tok.name == "byte":
        return
    copy_tokenizer(tok.name, tok, dest, sub="")
    if not (dest / "tokenizer_config.json").is_file():
        # A bare tokenizer.json: tell AutoTokenizer which class reads it.
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def _check_copy(spec: str, tok: dataset.Tokenizer, copied: dataset.Tokenizer) -> None:
    same = (
        copied.vocab_size == tok.vocab_size
        and copied.eos == tok.eos
        and np.array_equal(np.asarray(copied.encode(_PROBE)), np.asarray(tok.encode(_PROBE)))
    )
    if not same:
        raise ConfigError(
            "data.tokenizer",
            f"{spec}: its copied files do not reproduce it (it needs files beyond "
            f"{', '.join(TOKENIZER_FILES)})",
        )


def tokenizer_spec(meta: dict, export_dir: Path) -> str:
    """The export's tokenizer as `dataset.load_tokenizer` takes it: `byte`, or its copy."""
    spec = meta["tokenizer"]
    return spec if spec == "byte" else str((export_dir / spec).resolve())


def config(raw: dict, tokenizer: str) -> TrainConfig:
    """The export's config: the run's, without the folded sections and with the export's own
    tokenizer. Parsing it looks at no path outside the export (`init.from` is gone; a
    `checkpoint.resume` path is a training setting)."""
    raw = copy.deepcopy(raw)
    for section in FOLDED_SECTIONS:
        raw.pop(section, None)
    raw.setdefault("data", {})["tokenizer"] = tokenizer
    raw.setdefault("checkpoint", {})["resume"] = "none"
    return schema.parse(raw)
