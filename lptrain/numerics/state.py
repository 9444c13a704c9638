"""Explicit quantizer state that must survive a checkpoint.

`ScalingState` holds TE delayed-scaling history (§2.2) and the UE5M3 sample-and-hold tensor
reference (§2.8). Tensors are FP32 (also when a model is bf16) and can be registered as module
buffers; `state_dict()` / `load_state_dict()` round-trip them. `amax_reduce` (not saved) lets a
trainer all-reduce (MAX) new amaxes over the data-parallel group, as TE does, so every rank
holds the same history.
"""

from __future__ import annotations

from typing import Callable

import torch


class ScalingState:
    def __init__(self, history_len: int = 1024, device: torch.device | str | None = None):
        self.amax_history = torch.zeros(history_len, dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)  # enc, TE's "scale"
        self.ref = torch.zeros((), dtype=torch.float32, device=device)  # held tensor amax
        self.calls = torch.zeros((), dtype=torch.int64, device=device)
        self.amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        # frozen: use `scale` without recording or updating (a backward re-quantization of an
        # operand whose forward already updated this state).
        self.frozen = False

    @classmethod
    def from_buffers(
        cls, amax_history: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor, calls: torch.Tensor
    ) -> "ScalingState":
        """A view on existing tensors (e.g. a module's buffers); updates write through."""
        self = cls.__new__(cls)
        self.amax_history, self.scale, self.ref, self.calls = amax_history, scale, ref, calls
        self.amax_reduce = None
        self.frozen = False
        return self

    def reduce(self, amax: torch.Tensor) -> torch.Tensor:
        return self.amax_reduce(amax) if self.amax_reduce is not None else amax

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "amax_history": self.amax_history.clone(),
            "scale": self.scale.clone(),
            "ref": self.ref.clone(),
            "calls": self.calls.clone(),
        }

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for k in ("amax_history", "scale", "ref", "calls"):
            getattr(self, k).copy_(d[k])

    def __repr__(self) -> str:
        return (
            f"ScalingState(history_len={self.amax_history.numel()}, "
            f"scale={float(self.scale):.6g}, calls={int(self.calls)})"
        )


# The name the issue uses for the delayed-scaling state object.
DelayedScalingState = ScalingState
