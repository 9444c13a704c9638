"""Compact optimizer states on another number of ranks (an elastic resume, checkpoint/elastic.py).

Under ZeRO 1-2 each rank's `CompactAdamW` holds one slice of each parameter group's flat buffer,
[r P, (r + 1) P) on rank r of W, and its blocks are the whole buffer's (`block_starts`). So the
codes of an element and the scale of a block that lies inside one slice are the same whatever W
is, and they carry over to a new layout bit for bit. Only a block cut by a slice boundary,
before or after, has no such form: each side holds its own scale (the old layout) or would
need one (the new). Such a block is decoded and encoded again in the new slice. Per group and
moment that is at most one block per boundary.

A `bf16` moment is a plain cast, element by element: it is cut and joined as it is.

Each saved param group says its blocks are the buffer's (`LAYOUT`). A state saved before that
(lptrain before commit 507c4ec, 2026-12-07) has no mark: there each slice's blocks began at its
own first element (start 0), which differs from the buffer's blocks wherever a slice does not
start at a multiple of BLOCK. `saved_start` tells where a saved slice's blocks begin and
`regrouped` re-encodes such a slice once, in the buffer's blocks.
"""

from __future__ import annotations

import torch

from lptrain.errors import ConfigError
from lptrain.optim import states as st

MOMENTS = st.MOMENTS
# CompactAdamW's param-group key (torch's Optimizer.state_dict saves group keys, and
# load_state_dict restores them): the saved blocks are the group buffer's (`block_starts`).
LAYOUT, GROUP_ALIGNED = "block_layout", "group-aligned"


def saved_start(group: dict, start: int) -> int:
    """Where the blocks of a saved slice begin, the slice starting at element `start` of its
    group's buffer: `start` in a state whose param group `group` says group-aligned blocks; 0
    in one without the mark (saved before 507c4ec: blocks from each slice's first element)."""
    layout = group.get(LAYOUT)
    if layout is None:
        return 0
    if layout != GROUP_ALIGNED:
        raise ConfigError(
            "checkpoint.resume",
            f"the optimizer states were saved with {LAYOUT} {layout!r}, which this lptrain does "
            f"not read (it knows {GROUP_ALIGNED!r}); resume with the lptrain that saved them",
        )
    return start


def regrouped(part: dict, fmt: st.StateFormat, saved_at: int, start: int):
    """A slice's state saved with blocks from element `saved_at` (`saved_start`), in the blocks
    from `start`: each coded moment decoded as saved and encoded once more. Returns (state,
    blocks whose decoded values changed, over both moments); (the state as it is, None) where
    both put the block boundaries in the same places (bf16, or the same offset in a block)."""
    if fmt.dtype is not None or saved_at % st.BLOCK == start % st.BLOCK:
        return part, None
    out, changed = dict(part), 0
    for name in MOMENTS:
        codec = fmt.codec(name)
        old = st.decode(part[f"{name}_codes"], part[f"{name}_scales"], codec, start=saved_at)
        codes, scales = st.encode(old, codec, start)
        new = st.decode(codes, scales, codec, start=start)
        same = (new == old) | (new.isnan() & old.isnan())  # NaN stays NaN: not a change
        changed += int(st.blocks(~same, start).any(dim=1).sum())
        out[f"{name}_codes"], out[f"{name}_scales"] = codes, scales
    return out, changed


def regrouped_note(states: str, changed: int) -> str:
    """The line a load says when it re-encoded states saved before group-aligned blocks."""
    return (
        f"checkpoint: {states} optimizer states saved with per-slice blocks (lptrain before "
        f"507c4ec, 2026-12-07): re-encoded in group-aligned blocks; {changed} block(s) changed "
        "(requantized from their saved values)"
    )


def decoded(part: dict, fmt: st.StateFormat, start: int) -> dict:
    """One old slice's state with both moments as FP32 tensors (the form DeepSpeed's universal
    converter reads), the slice starting at element `start` of its group's buffer."""
    out = {k: v for k, v in part.items() if k == "step"}
    for name in MOMENTS:
        out[name] = _joined([part], fmt, name, start)
    return out


def partition(parts: list[dict], fmt: st.StateFormat, numel: int, start: int, length: int):
    """The state of the slice [start, start + length) of a group's flat buffer of `numel`
    elements (padding beyond it is 0), from `parts`, the states of the old slices in rank order
    (equal lengths). Returns (state, blocks encoded again), the count over both moments."""
    out = {"step": parts[0]["step"].clone()}
    redone = 0
    for name in MOMENTS:
        whole = _joined(parts, fmt, name, 0)
        if fmt.dtype is not None:
            out[name] = _cut(whole, start, length).to(fmt.dtype)
            continue
        codec = fmt.codec(name)
        codes, scales = st.encode(_cut(whole, start, length), codec, start)
        keep = _kept_blocks(numel, parts[0][f"{name}_codes"].numel(), start, length)
        per_block = scales.reshape(len(keep), -1)
        per_block[keep] = _old_scales(parts, name, codec)[_block_ids(start, length)[keep]]
        saved = torch.cat([p[f"{name}_codes"] for p in parts])
        mask = keep.repeat_interleave(st.BLOCK)[start % st.BLOCK :][:length]
        codes = torch.where(mask, _cut(saved, start, length), codes)
        out[f"{name}_codes"], out[f"{name}_scales"] = codes, scales
        live = _block_ids(start, length) * st.BLOCK < numel  # blocks of padding only: not counted
        redone += int((live & ~keep).sum())
    return out, redone


def _joined(parts: list[dict], fmt: st.StateFormat, name: str, start: int) -> torch.Tensor:
    """The moment `name` of consecutive slices as one FP32 tensor, the first slice starting at
    element `start` of the group's buffer."""
    out = []
    for part in parts:
        if fmt.dtype is not None:
            x = part[name].float()
        else:
            codec = fmt.codec(name)
            x = st.decode(part[f"{name}_codes"], part[f"{name}_scales"], codec, start=start)
        out.append(x)
        start += x.numel()
    return torch.cat(out)


def _cut(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """x[start : start + length], zero-padded past x's end (ZeRO pads the last slice)."""
    tail = max(0, start + length - x.numel())
    return torch.nn.functional.pad(x, (0, tail))[start : start + length]


def _block_ids(start: int, length: int) -> torch.Tensor:
    """The group-buffer indices of the blocks the slice [start, start + length) touches."""
    return torch.arange(start // st.BLOCK, start // st.BLOCK + st.n_blocks(length, start))


def _kept_blocks(numel: int, old_length: int, start: int, length: int) -> torch.Tensor:
    """Per block of the new slice: its real elements (those < numel) lie inside one old slice
    and inside the new one, so its saved codes and scale hold as they are."""
    lo = _block_ids(start, length) * st.BLOCK
    hi = torch.clamp(lo + st.BLOCK, max=numel) - 1  # its last real element
    one_old = lo // old_length == hi // old_length
    inside_new = (lo >= start) & (hi < start + length)
    return (lo < numel) & one_old & inside_new


def _old_scales(parts: list[dict], name: str, codec: st.Codec) -> torch.Tensor:
    """Every block's saved scale row, indexed by group-buffer block (a block two old slices
    share gets the later one's: never read, `_kept_blocks` excludes it)."""
    length = parts[0][f"{name}_codes"].numel()
    n = st.n_blocks(length * len(parts))
    table = torch.zeros(n, codec.per_block)
    for r, part in enumerate(parts):
        rows = part[f"{name}_scales"].reshape(-1, codec.per_block)
        first = r * length // st.BLOCK
        table[first : first + len(rows)] = rows
    return table
