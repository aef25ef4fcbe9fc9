"""Atomic file writes: a temporary file beside the destination, renamed onto it once complete.

A reader (another rank, a resumed run, a job script) therefore sees the old file or the new one, never a
partial one. The temporary file is ``.NAME.tmp-PID`` in the destination's folder (the same file system, so
the rename is atomic; hidden, and the PID keeps concurrent writers apart); it is removed when the block
raises. Folders are swapped by their own code (model/export.py, train/checkpointing.py), not here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temp_name(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`atomic_path` writes for ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary file name for a writer that takes a name (``torch.save``); on success it is
    renamed onto ``path``, on an exception removed (``path`` untouched)."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = None) -> Iterator[IO[Any]]:
    """``with atomic_write(path, "w" or "wb") as fh:`` the file object of the temporary file; closed, then
    renamed onto ``path`` when the block ends, removed if it raises. ``encoding`` as for ``open``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a new file: mode 'w' or 'wb' (got {mode!r})")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str | None = None) -> None:
    """``Path(path).write_text(text, encoding)``, atomically."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
