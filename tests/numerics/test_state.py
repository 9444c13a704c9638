"""ScalingState (numerics/state.py): module buffers that survive checkpoints and bf16 casts."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lptrain.numerics import QuantSpec, ScalingState, fake_quantize
from lptrain.numerics.state import thaw


def test_buffers_round_trip_and_stay_fp32_under_bf16():
    st = ScalingState(history_len=4)
    spec = QuantSpec("fp8_e4m3", scaling="delayed", history_len=4)
    for amax in (10.0, 20.0):
        fake_quantize(torch.full((8,), amax), spec, state=st)
    assert set(st.state_dict()) == {"amax_history", "scale", "ref", "calls"}
    fresh = ScalingState(history_len=4)
    fresh.load_state_dict(st.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), st.state_dict().values(), strict=True)
    )
    holder = nn.Module()
    holder.st = st
    holder.to(torch.bfloat16)
    assert st.scale.dtype == torch.float32 and st.amax_history.dtype == torch.float32
    assert st.calls.dtype == torch.int64


def test_update_false_uses_the_state_and_changes_nothing():
    st = ScalingState(history_len=4)
    spec = QuantSpec("fp8_e4m3", scaling="delayed", history_len=4)
    fake_quantize(torch.full((8,), 10.0), spec, state=st)
    before = {k: v.clone() for k, v in st.state_dict().items()}
    snap = st.snapshot()
    x = torch.linspace(-50, 50, 16)
    a = fake_quantize(x, spec, state=st, update=False)
    b = fake_quantize(x, spec, state=thaw(snap), update=False)
    assert torch.equal(a, b)
    assert all(torch.equal(v, before[k]) for k, v in st.state_dict().items())
    # The scale in use is the one from the update after the first call: 448 / 10.
    assert torch.equal(
        a, fake_quantize(x * (448 / 10), QuantSpec("fp8_e4m3", scaling="none")) / (448 / 10)
    )


def test_a_cpu_snapshot_holds_no_tensor_and_thaws_to_the_same_values():
    """Snapshots live in a layer's ledger for 64 calls: tensors there fragment glibc's heap
    (numerics/state.py), so on a CPU they are Python numbers, exact for float32 and int64."""
    st = ScalingState(history_len=4)
    st.scale.fill_(float(torch.tensor(1.1754944e-38)))  # the smallest normal float32
    st.ref.fill_(3.0000002)  # not a float64-short value
    st.calls.fill_(2**53 + 1)  # beyond float64's integers
    for has_amax in (False, True):
        st.amax_history[1] = 7.5 if has_amax else 0.0
        snap = st.snapshot()
        assert all(isinstance(v, (bool, int, float)) for v in dataclasses.astuple(snap))
        back = thaw(snap)
        for name in ("scale", "ref", "calls"):
            assert torch.equal(getattr(back, name), getattr(st, name))
        assert bool((back.amax_history > 0).any()) == has_amax


def test_missing_keys_start_fresh():
    holder = nn.Module()
    holder.st = ScalingState(history_len=2)
    holder.load_state_dict({}, strict=True)  # a checkpoint without quantizer state
    assert float(holder.st.scale) == 1.0
