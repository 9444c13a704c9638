"""Rebuild a trained model without DeepSpeed, for `lptrain eval` and `lptrain export`.

`open_run(path)` takes a run directory or its `checkpoints/` directory (the newest checkpoint
that verifies, as a resume picks it) or one checkpoint tag (verified or refused), reads the
checkpoint's own `config.yaml` and base copy, rebuilds the model exactly as `lptrain train`
did (seed, build, the converter chain) and loads the checkpoint's module state.
`open_export(path)` rebuilds an export (write.py, fold.py) from its layout JSON and safetensors.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lptrain.checkpoint import base as bases
from lptrain.checkpoint import manifest, store
from lptrain.config import schema
from lptrain.config.inherit import tokenizer_spec
from lptrain.config.precision import resolve_recipe
from lptrain.config.schema import TrainConfig
from lptrain.data import dataset
from lptrain.distributed.engine import param_dtype
from lptrain.errors import ConfigError
from lptrain.export import standalone, validate
from lptrain.models import converters, hf, init_from
from lptrain.models.decoder import build_model
from lptrain.nn import backends
from lptrain.observe import guard
from lptrain.recipes import from_dict

EXPORT_JSON = validate.EXPORT_JSON
EXPORT_WEIGHTS = validate.EXPORT_WEIGHTS
EXPORT_MANIFEST = validate.MANIFEST


@dataclass
class Opened:
    cfg: TrainConfig
    model: nn.Module
    tok: dataset.Tokenizer
    source: str  # what was loaded, for messages and the export's record
    # the precision guard's per-layer recipes ({layer: Recipe.to_dict()}), in place in `model`
    fallbacks: dict = field(default_factory=dict)


def _quiet(_msg: str) -> None:
    pass


def skeleton(
    cfg: TrainConfig, tok: dataset.Tokenizer, *, names=converters.ORDER, say=_quiet, base=None
):
    """The run's model as `lptrain train` builds it, through the converters in `names`. An
    lptrain base's weights are not loaded (the checkpoint has them); a Hugging Face base's
    architecture comes from `base` (the checkpoint's copy, checkpoint/base.py) or, for a
    checkpoint from before such copies, from `init.from` itself."""
    cfg = portable(cfg, say)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.block_size)
    ctx = converters.ConvertContext(cfg.run.seed, 0, 1, say, vocab_size=tok.vocab_size)
    for conv in converters.build(cfg, names, base=base):
        if conv.name == "init" and conv.source.kind != "hf":
            continue
        model = converters.apply(model, [conv], ctx)
    return model


def portable(cfg: TrainConfig, say=_quiet) -> TrainConfig:
    """A run trained with `backend: triton`, read where Triton cannot run (a CPU machine): the
    emulated backend gives the same bits (the self-test holds Triton to it) and the same
    state keys, so the model is rebuilt with `auto`. TE swaps whole layers for its own; that
    stays an error naming precision.backend."""
    if cfg.precision.backend != "triton":
        return cfg
    try:
        backends.resolve("triton", resolve_recipe(cfg.precision))
    except backends.BackendError as exc:
        say(f"precision.backend: triton cannot run here ({exc.problem}); using auto, same bits")
        return replace(cfg, precision=replace(cfg.precision, backend="auto"))
    return cfg


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_checkpoint(path: Path, note=_stderr) -> tuple[Path | None, store.Found]:
    """(run dir or None, the checkpoint to read), picked as a resume picks it (store.pick),
    saying in one line which newer checkpoints did not verify."""
    if not path.exists():
        raise ConfigError("PATH", f"no such run directory, checkpoint or export: {path}")
    named = store.step_of(path.name) is not None or (path / manifest.NAME).is_file()
    if not (named or (path / "checkpoints").is_dir() or store.has_checkpoints(path)):
        raise ConfigError("PATH", f"{path} is not an lptrain run directory, checkpoint or export")
    found, rejected = store.pick(path, "PATH")
    if rejected:
        note(f"checkpoint: reading {found.tag}, the newest that verifies "
             f"({store.reasons(rejected)})")  # fmt: skip
    run_dir = found.ckpt_dir.parent
    return (run_dir if (run_dir / "config.yaml").is_file() else None), found


def locate_checkpoint(path: Path) -> tuple[Path, Path, str]:
    """(run dir, checkpoints dir, tag) of the checkpoint `path` names or holds (verified)."""
    run_dir, found = find_checkpoint(path, note=_quiet)
    return (run_dir if run_dir is not None else found.ckpt_dir.parent), found.ckpt_dir, found.tag


def open_run(path: str | Path, say=_quiet, note=_stderr) -> Opened:
    """A checkpoint that verifies, rebuilt from what it carries: its own config.yaml (not the
    run's, which a later resume may have changed) and its copy of the base."""
    _, found = find_checkpoint(Path(path), note)
    cfg = schema.load(found.path / store.CONFIG)
    base = bases.read_copy(found.path, "PATH")
    src = base.source if base is not None else None
    tok = dataset.load_tokenizer(tokenizer_spec(cfg, src))
    model = skeleton(cfg, tok, say=say, base=src)
    # The guard's fallbacks, as a resume puts them (they decide the layers' state keys too).
    fallen = guard.fallbacks(store.peek_rank0(found))
    _put(model, fallen, found.path)
    state = init_from.load_state(found.ckpt_dir, found.tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            "PATH",
            f"{found.path} does not match its config.yaml "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    _check_finite(model, found.path)
    return Opened(cfg, as_trained(model, cfg).eval(), tok, str(found.path), fallen)


def as_trained(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """`model` with its parameters in the dtype training ran them in (`param_dtype`: bf16 for
    `deepspeed.dtype: bf16` and `optim.master: bf16-sr`), buffers as they are, as the engine
    casts them. A bf16 checkpoint's weights are exact in that dtype; a ZeRO-3 checkpoint gives
    its fp32 master weights, which round to the same bf16 copy the engine made of them."""
    dtype = param_dtype(cfg)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def _put(model: nn.Module, recipes: dict, where: Path) -> None:
    """The recorded per-layer recipes ({layer: Recipe.to_dict()}) in place, or a ConfigError."""
    try:
        guard.put(model, {name: from_dict(d) for name, d in recipes.items()})
    except ValueError as exc:  # RecipeError is one: a record this lptrain cannot read
        raise ConfigError("PATH", f"{where}: {exc}") from None


def _check_finite(model: nn.Module, where: Path) -> None:
    """A weight that holds NaN or Inf makes every loss NaN: refuse it by name instead of
    printing `val_loss nan` (or exporting it) with exit 0."""
    bad = [
        n for n, p in model.named_parameters() if p.is_floating_point() and not p.isfinite().all()
    ]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ConfigError("PATH", f"{where}: {bad[0]}{more} hold NaN or Inf: not a usable model")


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
    cfg = portable(cfg, _stderr)
    if meta["hf_config"]:
        model = hf.from_config(d / "hf", key="export")
        precision = converters.build(cfg, ("precision",))
        model = converters.apply(model, precision, _ctx(cfg, tok))
    else:
        model = skeleton(cfg, tok, names=("precision",))
    _put(model, meta.get("fallbacks", {}), d / EXPORT_JSON)
    for name, layout in meta["layers"].items():
        validate.place(model, name, layout, d / EXPORT_JSON)
    validate.load_weights(model, d / EXPORT_WEIGHTS)
    validate.check_tensors(model, meta["layers"], d / EXPORT_WEIGHTS)
    _check_finite(model, d)
    return Opened(cfg, as_trained(model, cfg).eval(), tok, str(d), meta.get("fallbacks", {}))


def _ctx(cfg: TrainConfig, tok) -> converters.ConvertContext:
    return converters.ConvertContext(cfg.run.seed, 0, 1, _quiet, vocab_size=tok.vocab_size)


def open_any(path: str | Path, say=_quiet) -> Opened:
    if not Path(path).exists():
        raise ConfigError("PATH", f"no such run directory, checkpoint or export: {path}")
    if not is_export(path) and (Path(path) / "config.json").is_file():
        raise ConfigError(
            "PATH",
            f"{path} is a Hugging Face model directory (an `export --format hf` or "
            "`compressed-tensors` export, or a base): lptrain evaluates runs, checkpoints and "
            "int exports; the export printed its reloaded loss (lptrain_compressed.json keeps "
            "it), or load it with transformers",
        )
    return open_export(path) if is_export(path) else open_run(path, say)
