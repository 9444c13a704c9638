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
        ckpt = p / "checkpoints"
        return _checked(Source("lptrain", p, ckpt, _newest(ckpt), p), spec, named=False)
    if (p / "latest").is_file() or _newest(p) is not None:  # a checkpoints directory
        run = p.parent if (p.parent / "config.yaml").is_file() else None
        return _checked(Source("lptrain", p, p, _newest(p), run), spec, named=False)
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


def _newest(ckpt_dir: Path) -> str | None:
    """`latest` when it names a tag that is there, else the newest tag directory: which one
    verifies is decided later (checkpoint/store.py), and `latest` is not trusted for that."""
    try:
        latest = (ckpt_dir / "latest").read_text().strip()
    except OSError:
        latest = ""
    if latest and (ckpt_dir / latest).is_dir():
        return latest
    tags = [q.name for q in ckpt_dir.glob("step*") if q.is_dir() and q.name[4:].isdigit()]
    return max(tags, key=lambda t: int(t[4:])) if tags else None


def _checked(src: Source, spec, named: bool = True) -> Source:
    """A tag `spec` names must hold model states; for a directory, which of its checkpoints
    is read is decided by verification (checkpoint/base.py), not here."""
    if src.tag is None:
        raise ConfigError(KEY, f"{spec} has no finished checkpoint ({src.ckpt_dir} is empty)")
    if not named:
        return src
    tag_dir = src.ckpt_dir / src.tag
    if not tag_dir.is_dir():
        raise ConfigError(KEY, f"{spec}: checkpoint {src.tag} is missing")
    if not (tag_dir / MODEL_STATES).is_file() and not any(tag_dir.glob("zero_pp_rank_0_*")):
        raise ConfigError(KEY, f"{spec}: {tag_dir} holds no DeepSpeed model states")
    return src
