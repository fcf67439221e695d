"""A small labelled image set that simxent draws itself, so the demo needs no download.

Five shape classes (circle, square, triangle, cross, ring) in random colours, sizes, positions and
rotations on noisy random backgrounds. Colour carries no class information, so an encoder has to
learn shape - which SimCLR's colour jitter and crops push it to do.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "ring")


def _polygon(cx, cy, r, sides, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``shape``; drawn at 4x and downsampled for smooth edges."""
    s = 4 * size
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(80, 176, 3)) % 256  # far enough from the background to see
    noise = rng.normal(0, 4, (s, s, 3))
    im = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    r = rng.uniform(0.28, 0.45) * s
    cx, cy = rng.uniform(r, s - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    fill = tuple(int(c) for c in foreground)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.3)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                          (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape}")
    return im.resize((size, size), Image.Resampling.LANCZOS)


def make_shapes(root: str | Path, train_per_class: int = 600, test_per_class: int = 200, size: int = 32,
                seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for shape in CLASSES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(shape, size, rng).save(folder / f"{i:05d}.png")
    return root
