"""The pictures of the synthetic benchmark: visual signatures (shape x colour), group backgrounds (a 4x4
grid whose 12 border cells encode a group code in base 6), and the drawing of one image.

``render_image`` is a pure function of its arguments (its noise comes from the given seed), so images
can be drawn by any number of worker processes (``write_images`` is their task) without changing a byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "bar")
SIGNATURE_COLOURS = np.array(
    [(220, 30, 30), (30, 170, 40), (30, 60, 225), (240, 210, 20),
     (200, 40, 200), (20, 200, 210), (245, 130, 20), (250, 250, 250)],
    dtype=np.uint8,
)
BACKGROUND_COLOURS = np.array(
    [(40, 50, 100), (100, 110, 40), (110, 40, 55), (30, 105, 105), (128, 128, 128), (190, 165, 125), (70, 70, 70)],
    dtype=np.float32,
)  # the first 6 encode the group; the last fills the centre cells
BG_BASE = 6
BORDER_CELLS = [(r, c) for r in range(4) for c in range(4) if r in (0, 3) or c in (0, 3)]  # 12 cells
BG_CODES = BG_BASE ** len(BORDER_CELLS)
NUM_SIGNATURES = len(SHAPES) * len(SIGNATURE_COLOURS)


def _shape_points(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "bar":
        pts = [(-1.0, -0.38), (1.0, -0.38), (1.0, 0.38), (-1.0, 0.38)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + 2 * math.pi * k / 3 for k in range(3))]
    elif shape == "hexagon":
        pts = [(math.cos(2 * math.pi * k / 6), math.sin(2 * math.pi * k / 6)) for k in range(6)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + math.pi * k / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + math.pi * k / 5)) for k in range(10)]
    elif shape == "cross":
        w = 0.35
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    else:
        raise ValueError(shape)
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_image(size: int, noise: float, background: int, signature: int, seed: Iterable[int]) -> Image.Image:
    """The group background (code `background`), with signature `signature` drawn on it (-1: none)."""
    rng = np.random.default_rng(list(seed))
    grid = np.full((4, 4), len(BACKGROUND_COLOURS) - 1, dtype=np.int64)
    code = background
    for r, c in BORDER_CELLS:
        code, grid[r, c] = divmod(code, BG_BASE)
    cell = (np.arange(size) * 4) // size
    pixels = BACKGROUND_COLOURS[grid[cell[:, None], cell[None, :]]]
    img = Image.fromarray(pixels.astype(np.uint8))
    if signature >= 0:
        shape = SHAPES[signature // len(SIGNATURE_COLOURS)]
        colour = tuple(int(v) for v in SIGNATURE_COLOURS[signature % len(SIGNATURE_COLOURS)])
        jx, jy, js, jr = rng.uniform(-1.0, 1.0, 4)
        cx = size / 2 + jx * noise * 0.15 * size
        cy = size / 2 + jy * noise * 0.15 * size
        r = size * 0.28 * (1 + js * noise * 0.2)
        theta = jr * noise * math.pi / 6
        draw = ImageDraw.Draw(img)
        line = max(1, size // 32)
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(0, 0, 0), width=line)
        elif shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r * 0.4)))
        else:
            draw.polygon(_shape_points(shape, cx, cy, r, theta), fill=colour, outline=(0, 0, 0), width=line)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 30.0 * noise, (size, size, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img


def write_images(tasks: list[tuple[str, int, float, int, int, tuple[int, ...]]]) -> int:
    """Draw and save (JPEG, quality 90) each (path, size, noise, background, signature, seed) task; the count."""
    for path, size, noise, background, signature, seed in tasks:
        render_image(size, noise, background, signature, seed).save(path, format="JPEG", quality=90)
    return len(tasks)
