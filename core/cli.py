"""What every command says when the disk fills: one line naming where, instead of a traceback."""

from __future__ import annotations

import errno
from pathlib import Path


def disk_full_line(err: BaseException, where: str | Path | None = None,
                   then: str = "free space there, or write elsewhere, then run again") -> str | None:
    """The exit line for ENOSPC (``where``: the output folder, when the error names no file; ``then``: what to
    do, for this command); None for any other error, which the caller re-raises."""
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    # Libraries that name no errno: Hugging Face tokenizers (Rust) raise "No space left on device (os error 28)".
    if not (full or "No space left on device" in str(err)):
        return None
    return f"error: the disk is full (no space left on device writing {getattr(err, 'filename', None) or where}): {then}"
