"""Read an offline W&B run file (`run-<id>.wandb`) back, for tests: no network, no wandb API.

The file is a 7-byte header (`:W&B`, magic 0xBEE1, version) then LevelDB-log framing in 32 KiB
blocks: each chunk has a 7-byte header (crc32c uint32, length uint16, type uint8: 1 full,
2 first, 3 middle, 4 last), and a block tail shorter than 7 bytes is padding. Each record is a
`wandb_internal_pb2.Record` (../shared/docs/deepspeed-wandb.md, section 4.3).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # padding at the end of a block
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and n == 0:  # preallocated zeros: the end of what was written
            break
        buf += data[pos + _HEADER : pos + _HEADER + n]
        pos += _HEADER + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def history(path: Path) -> list[dict]:
    """The logged rows, each {"_step": step, key: value, ...}."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            rows.append({**items, "_step": r.history.step.num})
    return rows


def run_id(path: Path) -> str | None:
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run.run_id
    return None
