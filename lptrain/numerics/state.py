"""`ScalingState`: the quantizer state that must survive a checkpoint, as module buffers.

TE delayed scaling (algorithms.md §2.2) keeps an amax history and the scale (enc) the next call
uses; UE5M3 sample-and-hold (§2.8) keeps the held tensor reference `ref`, refreshed on a
schedule counted by `calls`. One class holds all four tensors. It is an `nn.Module` so that a
layer registers it as a submodule: the buffers travel in `state_dict()`, safetensors and
DeepSpeed checkpoints, and they stay FP32 when the model is cast to bf16 (TE does the same).

`amax_reduce` (a plain attribute, not saved) lets a trainer MAX-reduce each new amax over the
data-parallel group, as TE does, so that every rank holds the same state. Whether a call
*updates* the state is the caller's choice (`fake_quantize(..., update=False)`): evaluation
forwards and recomputed forwards use it without changing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

_FIELDS = ("amax_history", "scale", "ref", "calls")


class ScalingState(nn.Module):
    def __init__(self, history_len: int = 1024, device: torch.device | str | None = None):
        super().__init__()
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("amax_history", torch.zeros(history_len, **f32))
        self.register_buffer("scale", torch.ones((), **f32))  # enc, TE's "scale"
        self.register_buffer("ref", torch.zeros((), **f32))  # held tensor amax
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        self.amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reduce(self, amax: torch.Tensor) -> torch.Tensor:
        return self.amax_reduce(amax) if self.amax_reduce is not None else amax

    def snapshot(self) -> "ScalingState | FrozenState":
        """What a later replay of this call (a recomputed forward) must see; `thaw(...)` gives
        it back as a state.

        On a CPU it is plain Python numbers, no tensors. A layer keeps the snapshots of its
        last 64 calls (nn/call.py CallLedger), and small tensors that live that long, taken
        between the step's large temporaries, stop glibc's heap from shrinking: tiny-fp8's
        peak RSS grew from 0.61 to 1.2 GB over 60 steps with tensor snapshots, and stays flat
        with these (BENCHMARKS.md, "Trainer"). Elsewhere a detached copy, which reads nothing
        back to the host (an `.item()` per call would synchronise the GPU)."""
        if self.scale.device.type == "cpu":
            return FrozenState(
                has_amax=bool((self.amax_history > 0).any()),
                scale=self.scale.item(),
                ref=self.ref.item(),
                calls=int(self.calls),
            )
        copy = ScalingState(0, device=self.scale.device)
        for name in _FIELDS:
            setattr(copy, name, getattr(self, name).detach().clone())
        return copy

    def _apply(self, fn, recurse=True):
        # Move between devices, never change dtype: model.to(torch.bfloat16) keeps FP32 state.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A checkpoint without any of our keys (a plain nn.Linear one): start fresh, not fail.
        if not any(k.startswith(prefix) for k in state_dict):
            missing_keys[:] = [k for k in missing_keys if not k.startswith(prefix)]

    def extra_repr(self) -> str:
        return f"history_len={self.amax_history.numel()}"


@dataclass(frozen=True)
class FrozenState:
    """A CPU `ScalingState` as a replay reads it (`update=False`): the scale, the held
    reference and the call count (float32 and int64 values are exact as Python numbers), and
    whether the history holds an amax yet (delayed_init='current' asks only that)."""

    has_amax: bool
    scale: float
    ref: float
    calls: int


def thaw(snap: "ScalingState | FrozenState") -> ScalingState:
    """The state a replay quantizes with: a FrozenState as a ScalingState (a one-entry
    history, 1 where any amax was recorded, so `(history > 0).any()` is the same)."""
    if isinstance(snap, ScalingState):
        return snap
    st = ScalingState(1)
    st.amax_history.fill_(1.0 if snap.has_amax else 0.0)
    st.scale.fill_(snap.scale)
    st.ref.fill_(snap.ref)
    st.calls.fill_(snap.calls)
    return st
