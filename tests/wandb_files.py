"""Reads what an offline W&B run wrote (`<dir>/wandb/offline-run-*/run-<id>.wandb`) without the network:
the file is a LevelDB-style log (32 KiB blocks, each record a 7-byte header of checksum, length and
part type) of W&B's protobuf `Record`s, after a 7-byte `:W&B` header."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def history(path: Path) -> list[dict]:
    """The rows `run.log` wrote, in order, as {key: value}."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def step_metrics(path: Path) -> dict[str, str]:
    """What define_metric set: {glob or name: its step metric}."""
    return {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records(path)
            if r.WhichOneof("record_type") == "metric"}
