"""`init.from`: what a path names. An lptrain run directory (its latest checkpoint), its
`checkpoints/` directory, one checkpoint tag directory, or a local Hugging Face model directory.

Only the file system is read here (the recipe check runs `locate` before anything is written);
the weights load in lptrain/models/init_from.py. Every problem is a `ConfigError('init.from', ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lptrain.errors import ConfigError

KEY = "init.from"
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Source:
    kind: str  # "lptrain" (a checkpoint) or "hf"
    path: Path
    ckpt_dir: Path | None = None  # lptrain: the checkpoints directory and the tag in it
    tag: str | None = None
    run_dir: Path | None = None  # lptrain: the run directory (its config.yaml), if known
    # A run's copy of its base without weights (checkpoint/base.py): a Hugging Face base's
    # architecture and tokenizer, an lptrain base's config; the weights are the checkpoint's.
    config_only: bool = False


def _is_hf_dir(p: Path) -> bool:
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (p / "config.json").is_file() and any((p / w).exists() for w in weights)


def locate(spec: str | Path) -> Source:
    p = Path(spec).expanduser()
    if not p.exists():
        raise ConfigError(KEY, f"no such run directory, checkpoint or model directory: {spec}")
    if p.is_dir() and (p / "checkpoints").is_dir():  # a run directory
        p_ckpt = p / "checkpoints"
        if not (p_ckpt / "latest").is_file():
            raise ConfigError(KEY, f"{spec} has no finished checkpoint (checkpoints/latest)")
        tag = (p_ckpt / "latest").read_text().strip()
        return _checked(Source("lptrain", p, p_ckpt, tag, p), spec)
    if (p / "latest").is_file():  # a checkpoints directory
        run = p.parent if (p.parent / "config.yaml").is_file() else None
        return _checked(Source("lptrain", p, p, (p / "latest").read_text().strip(), run), spec)
    if any(p.glob("lptrain_rank*.pt")):  # one checkpoint tag
        run = p.parent.parent if (p.parent.parent / "config.yaml").is_file() else None
        return _checked(Source("lptrain", p, p.parent, p.name, run), spec)
    if _is_hf_dir(p):
        try:
            import transformers  # noqa: F401  optional dependency (the hf extra): is it there?
        except ImportError:
            raise ConfigError(
                KEY, f"{spec} is a Hugging Face model: it needs `pip install transformers`"
            ) from None
        return Source("hf", p)
    raise ConfigError(
        KEY,
        f"{spec} is not an lptrain run directory, checkpoint or Hugging Face model directory",
    )


def _checked(src: Source, spec) -> Source:
    tag_dir = src.ckpt_dir / src.tag
    if not tag_dir.is_dir():
        raise ConfigError(KEY, f"{spec}: checkpoint {src.tag} is missing")
    if not (tag_dir / MODEL_STATES).is_file() and not any(tag_dir.glob("zero_pp_rank_0_*")):
        raise ConfigError(KEY, f"{spec}: {tag_dir} holds no DeepSpeed model states")
    return src
