"""A captioned toy image set drawn on the fly (coloured shapes), for tests and benchmarks: no download needed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def _draw_shape(i: int, width: int, height: int, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """Image ``i`` of the set: ``(image, colour, shape)``, the shape centred somewhere in the middle third."""
    color = list(COLORS)[i % len(COLORS)]
    shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    r = min(width, height) * rng.uniform(0.22, 0.32)
    cx, cy = np.array([width, height]) * rng.uniform(0.35, 0.65, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img, color, shape


def make_shapes_dataset(folder: str | Path, count: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` PNGs and an ``img_txt.csv`` (mindone layout) such as "a red circle on a white background"."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        img, color, shape = _draw_shape(i, size, size, rng)
        name = f"images/{i:04d}.png"
        img.save(folder / name)
        rows.append((name, f"a {color} {shape} on a white background"))
    with open(folder / "img_txt.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["dir", "text"])
        writer.writerows(rows)
    return folder


def make_mixed_aspect_folder(folder: str | Path, sizes, repeats: int = 1, seed: int = 0) -> Path:
    """A kohya folder ``<repeats>_shapes/`` with one PNG per ``(width, height)`` in ``sizes`` and a ``.txt`` caption
    of tags, such as ``shapes, red, circle, white background``."""
    sub = Path(folder) / f"{repeats}_shapes"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        img, color, shape = _draw_shape(i, width, height, rng)
        img.save(sub / f"{i:04d}.png")
        (sub / f"{i:04d}.txt").write_text(f"shapes, {color}, {shape}, white background\n", encoding="utf-8")
    return Path(folder)
