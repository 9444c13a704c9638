"""`init.from`: the weights fine-tuning starts from, once lptrain/config/init_source.py has said
what the path is (a Hugging Face directory loads in hf.py, with `local_files_only`).

Weights come from DeepSpeed's module state (`mp_rank_00_model_states.pt`, stages 0-2) or,
for ZeRO-3 checkpoints, from DeepSpeed's own `zero_to_fp32` reader. Every problem is a
`ConfigError('init.from', ...)`: the CLI exits 2 before writing anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lptrain import safeload
from lptrain.config.init_source import KEY, MODEL_STATES
from lptrain.errors import ConfigError


def load_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module state (parameters and buffers) of a DeepSpeed checkpoint, without DeepSpeed's
    engine: the rank-0 module file for stages 0-2, `zero_to_fp32` for ZeRO-3. The caller has
    verified the checkpoint (checkpoint/store.py `verify`: its manifest and plain data in every
    pickled file, which is what makes handing it to `zero_to_fp32` safe)."""
    tag_dir = ckpt_dir / tag
    if (tag_dir / MODEL_STATES).is_file():
        return safeload.load(tag_dir / MODEL_STATES, KEY)["module"]
    problem = safeload.problem_in(tag_dir)  # zero_to_fp32 unpickles with weights_only=False
    if problem is not None:
        raise ConfigError(KEY, f"{tag_dir}: {problem}")
    from deepspeed.utils.zero_to_fp32 import (
        get_fp32_state_dict_from_zero_checkpoint,  # optional dependency (the train extra)
    )

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
