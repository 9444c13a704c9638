"""One optimizer step of the loop: `accum` micro-batches of forward and backward, one update."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from lptrain.distributed import engine as eng

if TYPE_CHECKING:
    from lptrain.checkpoint.store import Progress
    from lptrain.trainer.loop import Session  # the loop imports this module


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over micro-batches and ranks, unscaled
    grad_norm: float
    skipped: bool
    extra: dict = field(default_factory=dict)  # more metrics for the row (a wrapped step's)


def train_step(s: Session, p: Progress) -> StepResult:
    """One optimizer step: `accum` micro-batches of forward and backward, then the update."""
    e = s.engine
    loss_sum, grad_norm = 0.0, float("nan")
    for m in range(s.layout.accum):
        batch = s.train_src.batch(s.layout.start(p.sample_index, m), s.layout.micro)
        batch = batch.to(e.device)  # the engine does not move inputs; a no-op on CPU
        loss = e(batch)
        loss_sum += float(loss.detach())
        e.backward(loss)
        hook = s.monitoring.before_update if s.monitoring is not None else None
        norm = eng.micro_step(e, s.manual_nonfinite_check, hook)
        if norm is not None:
            grad_norm = norm
    (loss_total,) = eng.all_reduce([loss_sum], dist.ReduceOp.SUM)
    mean_loss = loss_total / (s.layout.accum * s.layout.world)
    skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
    return StepResult(mean_loss, grad_norm, skipped)
