"""Compact optimizer states cut to another rank count (optim/reshard.py): whole blocks carry
their saved codes and scales bit for bit; a block cut by a partition boundary is encoded again
from its decoded values. The 2-rank run that uses it: tests/checkpoint/test_elastic.py."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.optim import reshard
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
