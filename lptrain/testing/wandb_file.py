"""Read an offline W&B run file (`run-<id>.wandb`) back, for tests that must not need a server.

Format (wandb 0.19-0.31, shared/docs/deepspeed-wandb.md 4.3): a 7-byte header (`:W&B`, magic
0xBEE1 little-endian, version 0), then LevelDB-log framing in 32 KiB blocks: each chunk has a
7-byte header (crc32c, uint16 length, type 1 full / 2 first / 3 middle / 4 last) and block tails
shorter than a chunk header are padding. Each reassembled record is a protobuf
`wandb.proto.wandb_internal_pb2.Record`, parsed with wandb's own definitions.

An internal format: if a wandb release changes it, the header check fails loudly here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError("not a W&B transaction log (bad header)")
    pos, parts = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # padding at the end of a block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero-filled tail of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def _items(items) -> dict:
    out = {}
    for it in items:
        key = it.key if it.key else ".".join(it.nested_key)
        out[key] = json.loads(it.value_json)
    return out


@dataclass
class WandbRun:
    history: list[dict] = field(default_factory=list)  # one dict per history record
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    run_id: str | None = None
    run: dict = field(default_factory=dict)  # name, group, job_type, tags
    metrics: dict = field(default_factory=dict)  # define_metric: name -> step_metric, summary


def read_wandb_file(path: str | Path) -> WandbRun:
    from wandb.proto import wandb_internal_pb2  # optional dependency (the train extra)

    run = WandbRun()
    for payload in _payloads(Path(path).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = _items(rec.history.item)
            row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "run":
            run.config.update(_items(rec.run.config.update))
            run.run_id = run.run_id or rec.run.run_id
            r = rec.run
            run.run = {"name": r.display_name, "group": r.run_group, "job_type": r.job_type,
                       "tags": list(r.tags)}  # fmt: skip
        elif kind == "metric":
            m = rec.metric
            summary = sorted(f.name for f, on in m.summary.ListFields() if on)
            run.metrics[m.name] = {"step_metric": m.step_metric or None, "summary": summary}
        elif kind == "config":
            run.config.update(_items(rec.config.update))
    return run


def history(path: str | Path) -> list[dict]:
    """The logged rows, each {"_step": step, key: value, ...}."""
    return read_wandb_file(path).history


def run_id(path: str | Path) -> str | None:
    return read_wandb_file(path).run_id
