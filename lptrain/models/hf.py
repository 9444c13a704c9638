"""A Hugging Face causal LM behind the trainer's model interface: `forward(tokens (B, T+1))`
returns the mean next-token cross-entropy, like `model.Decoder`. Loaded from a local
directory only (`local_files_only=True`): no network, ever."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lptrain.errors import ConfigError, first_line


class HFCausalLM(nn.Module):
    # What peft (and a transformers user) sees is the model inside: lora.save_peft/load_peft
    # name adapter layers by their path in it (no `model.` prefix of this wrapper).
    peft_root = "model"

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.model = hf_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens[:, :-1], use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def load(path: str | Path, key: str = "init.from") -> HFCausalLM:
    from transformers import AutoModelForCausalLM  # optional dependency (the hf extra)

    try:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:  # a missing or unreadable file in the directory
        raise ConfigError(key, f"{path}: cannot load the model ({first_line(exc)})") from None
    return HFCausalLM(hf.train())


def _config(path: str | Path, key: str):
    from transformers import AutoConfig  # optional dependency (the hf extra)

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{path}: cannot read config.json ({first_line(exc)})") from None


def from_config(config_dir: str | Path, key: str = "init.from") -> HFCausalLM:
    """The architecture without weights (an export's skeleton)."""
    from transformers import AutoModelForCausalLM  # optional dependency (the hf extra)

    cfg = _config(config_dir, key)
    return HFCausalLM(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))


def skeleton(config) -> nn.Module:
    """The Hugging Face model `config` describes, on the meta device (no memory, no weights):
    which class each layer is and every tensor's name and shape, as `from_pretrained` reads
    them."""
    from transformers import AutoModelForCausalLM  # optional dependency (the hf extra)

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def position_limit(config) -> tuple[str, int] | None:
    """(key, value) of the longest sequence the model embeds positions for: GPT-2's
    `n_positions`, most others' `max_position_embeddings`; None when its config states none."""
    for key in ("n_positions", "max_position_embeddings"):
        limit = getattr(config, key, None)
        if isinstance(limit, int):
            return key, limit
    return None


def check_positions(path: str | Path, block_size: int) -> None:
    """Refuse a block longer than the model embeds positions for (GPT-2's position table
    would be indexed out of range in the first step), from its config.json alone."""
    limit = position_limit(_config(path, "init.from"))
    if limit is not None and block_size > limit[1]:
        raise ConfigError(
            "data.block_size",
            f"{block_size} is longer than the model at {path} handles ({limit[0]}: {limit[1]})",
        )


def vocab_size(model: HFCausalLM) -> int:
    return model.model.get_input_embeddings().weight.shape[0]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# A save_pretrained directory may hold these too (added tokens, the chat template): a deployed
# tokenizer needs them, evaluation does not.
EXTRA_TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json")
