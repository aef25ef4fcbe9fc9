"""Read an offline W&B run back from its own transaction log (``run-ID.wandb``), with W&B's protobuf schema.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, 0xBEE1, version), then 32 KiB blocks of
chunks, each with a 7-byte header (CRC-32 of type byte + payload, length, type: 1 full, 2 first,
3 middle, 4 last); a serialized ``wandb.proto.wandb_internal_pb2.Record`` per full (or joined) chunk.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768


def records(path: str | Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    magic, ident, _version = struct.unpack("<4sHB", data[:7])
    if magic != b":W&B" or ident != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += 7 + length
        parts.append(payload)
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def history(path: str | Path) -> list[dict]:
    """Every history row W&B kept, as {key: value} (nested keys joined with '/')."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item})
    return rows
