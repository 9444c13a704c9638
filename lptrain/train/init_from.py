"""`init.from`: where fine-tuning starts. An lptrain run directory (its latest checkpoint), its
`checkpoints/` directory, one checkpoint tag directory, or a local Hugging Face model
directory (weights, config and tokenizer load with `local_files_only`: no network).

Weights come from DeepSpeed's module state (`mp_rank_00_model_states.pt`, stages 0-2) or,
for ZeRO-3 checkpoints, from DeepSpeed's own `zero_to_fp32` reader. Every problem is a
`ConfigError('init.from', ...)`: the CLI exits 2 before writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lptrain.train.config import ConfigError

KEY = "init.from"
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Source:
    kind: str  # "lptrain" (a checkpoint) or "hf"
    path: Path
    ckpt_dir: Path | None = None  # lptrain: the checkpoints directory and the tag in it
    tag: str | None = None
    run_dir: Path | None = None  # lptrain: the run directory (its config.yaml), if known


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
            import transformers  # noqa: F401
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


def base_config(src: Source):
    """The base run's TrainConfig (None when the checkpoint has no run directory)."""
    from lptrain.train import config

    if src.kind != "lptrain" or src.run_dir is None:
        return None
    return config.load(src.run_dir / "config.yaml")


def load_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module state (parameters and buffers) of a DeepSpeed checkpoint, without DeepSpeed's
    engine: the rank-0 module file for stages 0-2, `zero_to_fp32` for ZeRO-3."""
    tag_dir = ckpt_dir / tag
    if (tag_dir / MODEL_STATES).is_file():
        blob = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
        return blob["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


@torch.no_grad()
def load_into(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> int:
    """Copy the base's tensors into `model` (the same architecture before any conversion).
    Quantizer state of the base's low-precision layers is not carried over (the fine-tune
    recipe may differ); anything else that is missing or has another shape is an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(
            KEY, f"{where} lacks {len(missing)} tensors of this model, e.g. {missing[0]!r}"
        )
    for k, t in own.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise ConfigError(
                KEY,
                f"{k}: the base has shape {tuple(state[k].shape)}, this recipe's model "
                f"{tuple(t.shape)} (the model section must match the base run's)",
            )
    model.load_state_dict({k: state[k] for k in own})
    return len(own)


def tokenizer_spec(cfg) -> str:
    """The tokenizer of a fine-tuning run: `data.tokenizer` when set to anything but the
    default `byte`; otherwise the base's (an lptrain run's data.tokenizer, or a Hugging Face
    directory's own tokenizer when it ships one)."""
    spec = cfg.data.tokenizer
    if spec != "byte" or cfg.init.from_ is None:
        return spec
    src = locate(cfg.init.from_)
    if src.kind == "hf":
        has_tok = any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return str(src.path) if has_tok else spec
    base = base_config(src)
    return base.data.tokenizer if base is not None else spec
