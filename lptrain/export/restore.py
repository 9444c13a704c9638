"""Rebuild a trained model without DeepSpeed, for `lptrain eval` and `lptrain export`.

`open_run(path)` takes a run directory (its latest checkpoint), a `checkpoints/` directory or
one checkpoint tag, reads the run's `config.yaml`, rebuilds the model exactly as `lptrain
train` did (seed, build, the converter chain) and loads the checkpoint's module state.
`open_export(path)` rebuilds an export (write.py, fold.py) from its layout JSON and safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lptrain.config import schema
from lptrain.config.inherit import tokenizer_spec
from lptrain.config.init_source import locate
from lptrain.config.schema import TrainConfig
from lptrain.data import dataset
from lptrain.errors import ConfigError
from lptrain.export import standalone, validate
from lptrain.models import converters, hf, init_from
from lptrain.models.decoder import build_model

EXPORT_JSON = validate.EXPORT_JSON
EXPORT_WEIGHTS = validate.EXPORT_WEIGHTS
EXPORT_MANIFEST = validate.MANIFEST


@dataclass
class Opened:
    cfg: TrainConfig
    model: nn.Module
    tok: dataset.Tokenizer
    source: str  # what was loaded, for messages and the export's record


def _quiet(_msg: str) -> None:
    pass


def skeleton(cfg: TrainConfig, tok: dataset.Tokenizer, *, names=converters.ORDER, say=_quiet):
    """The run's model as `lptrain train` builds it, through the converters in `names`. An
    lptrain base's weights are not loaded (the checkpoint has them); a Hugging Face base is."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.block_size)
    ctx = converters.ConvertContext(cfg.run.seed, 0, 1, say, vocab_size=tok.vocab_size)
    for conv in converters.build(cfg, names):
        if conv.name == "init" and conv.source.kind != "hf":
            continue
        model = converters.apply(model, [conv], ctx)
    return model


def locate_checkpoint(path: Path) -> tuple[Path, Path, str]:
    """(run dir, checkpoints dir, tag) for a run dir, a checkpoints dir or a tag dir."""
    try:
        src = locate(path)
    except ConfigError as exc:
        raise ConfigError("PATH", exc.problem) from None
    if src.kind != "lptrain" or src.run_dir is None:
        raise ConfigError("PATH", f"{path} is not in an lptrain run directory (no config.yaml)")
    return src.run_dir, src.ckpt_dir, src.tag


def open_run(path: str | Path, say=_quiet) -> Opened:
    run_dir, ckpt_dir, tag = locate_checkpoint(Path(path))
    cfg = schema.load(run_dir / "config.yaml")
    tok = dataset.load_tokenizer(tokenizer_spec(cfg))
    model = skeleton(cfg, tok, say=say)
    state = init_from.load_state(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            "PATH",
            f"{ckpt_dir / tag} does not match its config.yaml "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    return Opened(cfg, model.eval(), tok, str(ckpt_dir / tag))


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_JSON).is_file()


def open_export(path: str | Path) -> Opened:
    """An export, verified (validate.py) before anything is read, and built from it alone
    (standalone.py): the model skeleton (precision converters only; a Hugging Face base from
    the saved config), each exported layer rebuilt from its layout, then the tensors."""
    d = Path(path)
    meta = validate.verified_meta(d)
    tok = dataset.load_tokenizer(standalone.tokenizer_spec(meta, d))
    try:
        cfg = standalone.config(meta["config"], tok.name)
    except ConfigError as exc:
        raise ConfigError("PATH", f"{d / EXPORT_JSON}: config.{exc.path}: {exc.problem}") from None
    if meta["hf_config"]:
        model = hf.from_config(d / "hf", key="export")
        precision = converters.build(cfg, ("precision",))
        model = converters.apply(model, precision, _ctx(cfg, tok))
    else:
        model = skeleton(cfg, tok, names=("precision",))
    for name, layout in meta["layers"].items():
        validate.place(model, name, layout, d / EXPORT_JSON)
    validate.load_weights(model, d / EXPORT_WEIGHTS)
    validate.check_tensors(model, meta["layers"], d / EXPORT_WEIGHTS)
    return Opened(cfg, model.eval(), tok, str(d))


def _ctx(cfg: TrainConfig, tok) -> converters.ConvertContext:
    return converters.ConvertContext(cfg.run.seed, 0, 1, _quiet, vocab_size=tok.vocab_size)


def open_any(path: str | Path, say=_quiet) -> Opened:
    if not Path(path).exists():
        raise ConfigError("PATH", f"no such run directory, checkpoint or export: {path}")
    return open_export(path) if is_export(path) else open_run(path, say)
