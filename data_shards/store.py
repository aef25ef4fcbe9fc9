"""Random access to any KB entity by id, straight from the KB shards.

Training needs each mention's gold entity, and later FAISS-mined hard negatives: arbitrary
entities, in arbitrary order. Choice: an *indexed tar reader*. The converter records, for every
entity, the shard number and the byte offset and size of its ``.json`` and ``.jpg`` members
(``kb/index.npy``, a structured array of 28 bytes per entity, memory-mapped: 28 MB for 1M
entities). A lookup is two ``os.pread`` calls into the very shards the KB stream reads, so there
is no second copy of the images, no database, nothing to keep in memory per entity, and reads
are safe from any number of DataLoader workers (file descriptors are reopened after a fork).
Text is tokenised at collation: a fast tokenizer costs microseconds per entity, and keeping raw
text lets one store serve any tokenizer and the description on/off ablation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class ShardError(RuntimeError):
    """A shard does not hold what the manifest says (truncated, damaged or replaced): re-convert or restore it."""


class EntityStore:
    """The KB's entities by id; built by ``ShardFolder.store()`` from the folder's manifest."""

    def __init__(self, root: Path, shard_paths: list[Path], index_path: Path, entities: int) -> None:
        self.root = Path(root)
        self.shard_paths = list(shard_paths)
        self.index = np.load(index_path, mmap_mode="r")
        if len(self.index) != entities:
            raise ValueError(f"{self.root}: entity index has {len(self.index)} rows, manifest says {entities}")
        self._check_sizes()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _check_sizes(self) -> None:
        """Every KB shard must be long enough for the members the index points into (one stat per
        shard): a truncated shard is an error here, not a garbled entity later."""
        if len(self.index) == 0:
            return
        ends = np.maximum(self.index["json_offset"] + self.index["json_size"], self.index["jpg_offset"] + self.index["jpg_size"])
        need = np.zeros(len(self.shard_paths), dtype=np.int64)
        np.maximum.at(need, np.asarray(self.index["shard"], dtype=np.int64), ends)
        for path, n in zip(self.shard_paths, need.tolist(), strict=True):
            size = path.stat().st_size if path.is_file() else -1
            if size < n:
                state = "missing" if size < 0 else f"truncated ({size} bytes, its entities need {n})"
                raise ShardError(f"{path} is {state}: convert the dataset again or restore the shard "
                                 "(python -m data_shards.verify checks every shard)")

    def __len__(self) -> int:
        return len(self.index)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: do not share offsets/fds
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        return fd

    def get(self, entity_id: int) -> dict:
        """{"json": metadata dict, "jpg": JPEG bytes or None} of one entity."""
        if not 0 <= entity_id < len(self.index):
            raise IndexError(f"entity id {entity_id} outside the KB (0..{len(self.index) - 1})")
        row = self.index[entity_id]
        fd = self._fd(int(row["shard"]))
        raw = self._read(fd, int(row["shard"]), int(row["json_size"]), int(row["json_offset"]))
        try:
            meta = json.loads(raw)
        except ValueError as err:
            raise ShardError(f"{self.shard_paths[int(row['shard'])]}: entity {entity_id} is not readable JSON ({err}): "
                             "the shard does not match kb/index.npy; convert the dataset again") from None
        if meta.get("id") != entity_id:
            raise ShardError(f"{self.shard_paths[int(row['shard'])]}: the index points entity {entity_id} at entity "
                             f"{meta.get('id')!r}: the shard does not match kb/index.npy; convert the dataset again")
        jpg = self._read(fd, int(row["shard"]), int(row["jpg_size"]), int(row["jpg_offset"])) if row["jpg_size"] else None
        return {"json": meta, "jpg": jpg}

    def _read(self, fd: int, shard: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ShardError(f"{self.shard_paths[shard]}: {len(data)} of {size} bytes at offset {offset}: the shard was "
                             "truncated (python -m data_shards.verify checks every shard)")
        return data

    def get_many(self, entity_ids) -> list[dict]:
        return [self.get(int(i)) for i in entity_ids]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:  # pickled into spawned workers: reopen lazily there
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state
