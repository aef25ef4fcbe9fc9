"""What every command says when the disk fills: one line naming where, instead of a traceback."""

from __future__ import annotations

import errno
from pathlib import Path


def disk_full(err: BaseException) -> bool:
    """ENOSPC, or what a library makes of it without an errno: torch.save's "[enforce fail at
    inline_container.cc] unexpected pos" or "file write failed" (RuntimeError), safetensors' and Hugging
    Face tokenizers' (Rust) "No space left on device (os error 28)"."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    return "No space left on device" in text or (isinstance(err, RuntimeError) and (
        "unexpected pos" in text or "file write failed" in text))


def disk_full_line(err: BaseException, where: str | Path | None = None,
                   then: str = "free space there, or write elsewhere, then run again") -> str | None:
    """The exit line for ENOSPC (``where``: the output folder, when the error names no file; ``then``: what to
    do, for this command); None for any other error, which the caller re-raises."""
    if not disk_full(err):
        return None
    return f"error: the disk is full (no space left on device writing {getattr(err, 'filename', None) or where}): {then}"
