"""A captioned toy image set drawn on the fly (coloured shapes), for tests and benchmarks: no download needed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def make_shapes_dataset(folder: str | Path, count: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write ``count`` PNGs and an ``img_txt.csv`` (mindone layout) such as "a red circle on a white background"."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        r = size * rng.uniform(0.22, 0.32)
        cx, cy = size * rng.uniform(0.35, 0.65, size=2)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        name = f"images/{i:04d}.png"
        img.save(folder / name)
        rows.append((name, f"a {color} {shape} on a white background"))
    with open(folder / "img_txt.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["dir", "text"])
        writer.writerows(rows)
    return folder
