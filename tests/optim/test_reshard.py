"""Compact optimizer states cut to another rank count (optim/reshard.py): whole blocks carry
their saved codes and scales bit for bit; a block cut by a partition boundary is encoded again
from its decoded values. The 2-rank run that uses it: tests/checkpoint/test_elastic.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lptrain.errors import ConfigError
from lptrain.optim import CompactAdamW, reshard
from lptrain.optim import states as st

NUMEL = 1000  # a parameter group's flat buffer


def _moments() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mag = torch.logspace(-6, -2, NUMEL)[torch.randperm(NUMEL, generator=g)]
    m = mag * torch.randn(NUMEL, generator=g)
    return m, m * m + mag * mag


def _slices(fmt: st.StateFormat, world: int) -> list[dict]:
    """Each rank's state as CompactAdamW stores it under ZeRO 1-2: equal slices of the
    zero-padded buffer, blocks of the whole buffer."""
    length = math.ceil(NUMEL / (2 * world)) * 2  # DeepSpeed's alignment of 2 elements
    out = []
    for r in range(world):
        part = {"step": torch.tensor(3.0)}
        for name, x in zip(reshard.MOMENTS, _moments(), strict=True):
            piece = reshard._cut(x, r * length, length)
            if fmt.dtype is not None:
                part[name] = piece.to(fmt.dtype)
                continue
            codec = fmt.m if name == "exp_avg" else fmt.v
            part[f"{name}_codes"], part[f"{name}_scales"] = st.encode(piece, codec, r * length)
        out.append(part)
    return out


@pytest.mark.parametrize("states", ["fp8", "int8-block"])
def test_two_ranks_to_one_keeps_every_whole_block_bit_for_bit(states):
    fmt = st.STATE_FORMATS[states]
    two, one = _slices(fmt, 2), _slices(fmt, 1)
    state, redone = reshard.partition(two, fmt, NUMEL, 0, len(one[0]["exp_avg_codes"]))
    cut = 500 // st.BLOCK  # the one block rank 0 and rank 1 share (500 = 3 x 128 + 116)
    assert redone == 2  # that block, in each moment
    for name in reshard.MOMENTS:
        codes, scales = state[f"{name}_codes"], state[f"{name}_scales"]
        saved_codes = torch.cat([p[f"{name}_codes"] for p in two])
        whole = torch.ones(len(codes), dtype=torch.bool)
        whole[cut * st.BLOCK : (cut + 1) * st.BLOCK] = False
        assert torch.equal(codes[whole], saved_codes[:NUMEL][whole])
        # The whole buffer encoded on one rank has the same blocks: its scales are these.
        assert torch.equal(scales[:cut], one[0][f"{name}_scales"][:cut])
        assert torch.equal(scales[cut + 1 :], one[0][f"{name}_scales"][cut + 1 :])
        # the cut block: the decoded values of both halves, encoded as one block
        codec = fmt.m if name == "exp_avg" else fmt.v
        joined = reshard._joined(two, fmt, name, 0)[:NUMEL]
        again = st.encode(joined, codec)
        assert torch.equal(codes, again[0].where(~whole, codes))
        assert torch.equal(scales[cut], again[1][cut])


@pytest.mark.parametrize("states", ["fp8", "int8-block"])
def test_one_rank_to_two_cuts_only_the_block_on_the_new_boundary(states):
    fmt = st.STATE_FORMATS[states]
    one = _slices(fmt, 1)
    got = [reshard.partition(one, fmt, NUMEL, r * 500, 500) for r in range(2)]
    assert [n for _, n in got] == [2, 2]  # block 3 on each side of 500, both moments
    direct = _slices(fmt, 2)  # what two ranks encode from the same (not decoded) moments
    for r, ((state, _), want) in enumerate(zip(got, direct, strict=True)):
        cut = 3 if r == 0 else 0  # the new boundary's block, in the rank's own numbering
        for key in ("exp_avg_codes", "exp_avg_sq_codes"):
            whole = torch.ones(500, dtype=torch.bool)
            whole[max(0, cut * st.BLOCK - r * 116) : (cut + 1) * st.BLOCK - r * 116] = False
            assert torch.equal(state[key][whole], want[key][whole]), key
        for key in ("exp_avg_scales", "exp_avg_sq_scales"):
            keep = torch.arange(len(state[key])) != cut
            assert torch.equal(state[key][keep], want[key][keep]), key
        # the cut block: its half of the decoded moment, encoded again
        codec = fmt.v
        part = reshard._cut(reshard._joined(one, fmt, "exp_avg_sq", 0), r * 500, 500)
        assert torch.equal(state["exp_avg_sq_scales"][cut], st.encode(part, codec, r * 500)[1][cut])


def test_bf16_moments_are_cut_and_joined_as_they_are():
    fmt = st.STATE_FORMATS["bf16"]
    state, redone = reshard.partition(_slices(fmt, 2), fmt, NUMEL, 0, 1000)
    assert redone == 0
    assert torch.equal(state["exp_avg"], _moments()[0].to(torch.bfloat16))


def test_decoded_slice_is_what_the_optimizer_decodes():
    fmt = st.STATE_FORMATS["fp8"]
    part = _slices(fmt, 2)[1]
    out = reshard.decoded(part, fmt, 500)
    want = st.decode(part["exp_avg_sq_codes"], part["exp_avg_sq_scales"], fmt.v, start=500)
    assert out["exp_avg_sq"].dtype == torch.float32 and torch.equal(out["exp_avg_sq"], want)
    assert set(out) == {"step", "exp_avg", "exp_avg_sq"}


# ------------------------------------------------ states saved before group-aligned blocks

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _rank_optimizer(states: str, start: int, length: int) -> tuple[CompactAdamW, torch.Tensor]:
    """The CompactAdamW of the rank holding [start, start + length) of the group buffer under
    ZeRO 1-2: `block_starts` set as distributed/engine.py `initialize` sets it, before
    DeepSpeed's checkpoint load calls `load_state_dict`."""
    flat = torch.nn.Parameter(torch.zeros(length))
    opt = CompactAdamW([flat], **HP, states=states)
    opt.block_starts = {flat: start}
    return opt, flat


def _saved_before_507c4ec(fmt: st.StateFormat, start: int, length: int) -> dict:
    """That rank's optimizer state dict as lptrain at 8be9b00 saved it: blocks from the slice's
    own first element (start 0), no layout mark in the param group."""
    part = {"step": torch.tensor(3.0)}
    for name, x in zip(reshard.MOMENTS, _moments(), strict=True):
        codec = fmt.m if name == "exp_avg" else fmt.v
        part[f"{name}_codes"], part[f"{name}_scales"] = st.encode(
            reshard._cut(x, start, length), codec, 0
        )
    return {"state": {0: part}, "param_groups": [{**HP, "params": [0]}]}


def _grid(x: torch.Tensor, scales: torch.Tensor, codec: st.Codec, start: int) -> torch.Tensor:
    """x on the code grid of the blocks `scales` describe (what `encode` rounds)."""
    b = st.blocks(x, start)
    s = scales.reshape(len(b), -1)
    if codec.transform == "expand":
        t = (b / s[:, :1]).pow(s[:, 1:]) * codec.qmax
    else:
        t = (b.sqrt() if codec.transform == "sqrt" else b) / s
    return t.reshape(-1)[start % st.BLOCK :][: x.numel()]


@pytest.mark.parametrize("states", ["fp8", "int8-block"])
def test_a_slice_saved_with_per_slice_blocks_is_re_encoded_once_on_load(states):
    # Rank 1 of 2 over a 300-element buffer: its slice starts at 150 = 128 + 22.
    fmt, start, length = st.STATE_FORMATS[states], 150, 150
    opt, flat = _rank_optimizer(states, start, length)
    saved = _saved_before_507c4ec(fmt, start, length)
    opt.load_state_dict(copy.deepcopy(saved))
    changed = 0
    for name in reshard.MOMENTS:
        codec = fmt.m if name == "exp_avg" else fmt.v
        part = saved["state"][0]
        old = st.decode(part[f"{name}_codes"], part[f"{name}_scales"], codec, start=0)
        codes, scales = opt.state[flat][f"{name}_codes"], opt.state[flat][f"{name}_scales"]
        # the reference: the old decode, encoded once in the buffer's blocks, bit for bit
        want = st.encode(old, codec, start)
        assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])
        new = st.decode(codes, scales, codec, start=start)
        assert not torch.equal(new, old)  # the blocks moved: decoding at 0 would be wrong
        # within the requantization bound: half a code step (int8; a non-zero sqrt(v) keeps
        # at least one code: one step), half an E4M3 ulp (2^-4 relative, 2^-10 subnormal)
        got = _grid(new, scales, codec, start)
        ideal = _grid(old, scales, codec, start)
        if codec.element == "fp8_e4m3":
            bound = torch.clamp(ideal.abs() * 2**-4, min=2**-10)
        else:
            bound = torch.full_like(ideal, 1.0 if codec.transform == "sqrt" else 0.5)
        assert bool(((got - ideal).abs() <= bound * (1 + 1e-4) + 1e-5).all()), name
        changed += int(st.blocks(new != old, start).any(dim=1).sum())
    assert opt.regrouped == changed > 0
    assert opt.param_groups[0][reshard.LAYOUT] == reshard.GROUP_ALIGNED  # saved from now on
    assert opt.state_dict()["param_groups"][0][reshard.LAYOUT] == reshard.GROUP_ALIGNED


@pytest.mark.parametrize("states", ["fp8", "int8-block", "bf16"])
def test_states_whose_blocks_lie_as_saved_load_bit_for_bit_and_say_nothing(states):
    fmt = st.STATE_FORMATS[states]
    # Rank 0's slice starts at 0: per-slice and group-aligned blocks are the same blocks.
    opt, flat = _rank_optimizer(states, 0, 150)
    if fmt.dtype is None:
        saved = _saved_before_507c4ec(fmt, 0, 150)
        opt.load_state_dict(copy.deepcopy(saved))
        assert opt.regrouped is None
        for key, value in saved["state"][0].items():
            assert torch.equal(opt.state[flat][key], value), key
    # A state saved with the mark, on a slice from 150: loaded as saved.
    opt, flat = _rank_optimizer(states, 150, 150)
    flat.grad = torch.ones(150)
    opt.step()
    new, _ = _rank_optimizer(states, 150, 150)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert new.regrouped is None
    (p,) = new.param_groups[0]["params"]
    for key, value in opt.state[flat].items():
        assert torch.equal(new.state[p][key], value), key


def test_an_unknown_block_layout_is_refused_in_one_line():
    opt, _ = _rank_optimizer("fp8", 150, 150)
    saved = _saved_before_507c4ec(st.STATE_FORMATS["fp8"], 150, 150)
    saved["param_groups"][0][reshard.LAYOUT] = "per-tensor"
    with pytest.raises(ConfigError, match="^checkpoint.resume: .*block_layout 'per-tensor'"):
        opt.load_state_dict(saved)
