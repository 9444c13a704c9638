"""Deterministic CPU memory accounting for tests (torch has no CPU peak-memory counter).

`live_bytes` sums the storages a model and its optimizer hold (parameters, buffers, gradients,
optimizer state; each storage once). `peak_bytes_during(fn)` replays the CPU allocator's
allocation and free events that `torch.profiler` records (`profile_memory=True`) and returns
the highest total allocated above the level at the start of `fn`: every transient (saved
activations, GEMM outputs, recomputed weight chunks, fresh gradients and optimizer state)
counts. The same code allocates the same bytes every run, so the numbers are exact and
repeatable, unlike RSS (the benchmarks report RSS peaks beside them).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile


def _storages(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def live_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _storages(tensors)


def peak_bytes_during(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak
