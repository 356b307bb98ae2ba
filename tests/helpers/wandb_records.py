"""Read an offline W&B run's `run-*.wandb` file, to check what a training really logged.

wandb >= 0.2x writes offline runs only as this record log (no files/config.yaml); its Python
reader was removed, so the tests parse the documented leveldb-log framing themselves: a 7-byte
header, then 32 KiB blocks of records (crc32, length, type) holding protobuf `Record`s.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, List

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_record_bytes(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, chunks = HEADER, []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            chunks = [payload]
        elif kind == MIDDLE:
            chunks.append(payload)
        elif kind == LAST:
            chunks.append(payload)
            yield b"".join(chunks)


def read_run(path: Path) -> Dict[str, Any]:
    """{'config': {...}, 'history': [{key: value}], 'summary': {...}, 'run_id': str}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: Dict[str, Any] = {"config": {}, "history": [], "summary": {}, "run_id": None}
    for raw in iter_record_bytes(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row: Dict[str, Any] = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
    return out


def history_keys(run: Dict[str, Any]) -> List[str]:
    return sorted({k for row in run["history"] for k in row})
