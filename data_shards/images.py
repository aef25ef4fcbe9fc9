"""Image preparation done once at conversion: decode, resize, crop, re-encode."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


def clip_resize(img: Image.Image, size: int) -> Image.Image:
    """CLIP preprocessing geometry: resize the shortest side to ``size`` (bicubic, aspect kept),
    then centre-crop ``size x size``."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(path: Path | None, size: int, quality: int) -> tuple[bytes | None, str]:
    """Returns (JPEG bytes, "") or (None, reason): "none" (no image listed), "missing", "unreadable: ..."."""
    if path is None:
        return None, "none"
    try:
        with Image.open(path) as img:
            out = clip_resize(img, size)
    except FileNotFoundError:
        return None, "missing"
    except READ_ERRORS as err:
        return None, f"unreadable: {type(err).__name__}: {err}"
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), ""
