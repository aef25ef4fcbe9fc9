"""Image preparation done once at conversion: decode, resize, crop, re-encode.

Images are opened only when they are regular files inside the folder they must come from (a
dataset's ``kb_image/`` or mention image folder): ``../``, absolute paths and symlinks that lead
out of it are refused, and a FIFO or device is never opened (it could block the converter).
High bit-depth images (16-bit grayscale ``I;16``, 32-bit ``I``, float ``F``) are scaled to 8 bits
instead of being clipped, which would turn them white.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any mode Pillow opens; integer and float modes wider than 8 bits are scaled to 0..255."""
    mode = img.mode
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) / 257.0  # 0..65535 -> 0..255
    elif mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            pass  # already an 8-bit range
        elif lo >= 0.0 and hi <= 65535.0:
            a = a / 257.0  # 16-bit data (Pillow opens some 16-bit files as "I")
        else:
            a = (a - lo) * (255.0 / (hi - lo))  # anything else: stretch its own range
    else:
        return img.convert("RGB")
    gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")


def clip_resize(img: Image.Image, size: int) -> Image.Image:
    """CLIP preprocessing geometry: resize the shortest side to ``size`` (bicubic, aspect kept),
    then centre-crop ``size x size``."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def confined(path: Path, folder: Path) -> bool:
    """True when ``path``, symlinks followed, lies inside ``folder`` (also resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; opened non-blocking so a FIFO cannot hang us.
    Raises FileNotFoundError, or ValueError("not a regular file ...")."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"not a regular file (mode {stat.filemode(st.st_mode)})")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def prepare_image(path: Path | None, size: int, quality: int, folder: Path | None = None) -> tuple[bytes | None, str]:
    """Returns (JPEG bytes, "") or (None, reason): "none" (no image listed), "missing",
    "refused: ..." (outside ``folder`` or not a regular file), "unreadable: ...".

    ``folder``: the image must lie inside it (symlinks resolved); None = no confinement (a user's own query image)."""
    if path is None:
        return None, "none"
    if folder is not None and not confined(path, folder):
        return None, f"refused: outside {Path(folder).name}/"
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        return None, "missing"
    except ValueError as err:
        return None, f"refused: {err}"
    except OSError as err:
        return None, f"unreadable: {type(err).__name__}: {err}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            out = clip_resize(img, size)
    except READ_ERRORS as err:
        return None, f"unreadable: {type(err).__name__}: {err}"
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), ""
