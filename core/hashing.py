"""sha256 of a file's bytes, read in chunks (shards and checkpoint files do not fit in memory at once)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str], chunk: int = CHUNK,
                on_block: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of the file at ``path``; ``on_block(n)`` after each block of n bytes (a progress bar)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()
