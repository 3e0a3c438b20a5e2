"""A mixed-aspect kohya folder from the shipped blueprint images, for the aspect-ratio bucket recipe.

    python tools/tiny_sd/make_kohya_example.py --out output/blueprint_kohya

The shipped images are 64x64 squares. Each is padded with its own corner colour to one of three shapes in turn (64x64,
96x64 landscape, 64x96 portrait), so the drawing is never cut, and written with its caption as a ``.txt`` sidecar in
kohya's tag style (``a blueprint drawing of heart (signs and symbols)`` becomes ``a blueprint drawing, heart, signs
and symbols``). The first half goes to ``2_blueprint drawing/`` (seen twice per epoch), the rest to
``1_blueprint drawing/``. Train on it with ``configs/train/train_config_lora_tiny_buckets.yaml`` (see
docs/datasets.md).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from PIL import Image

import ldm  # noqa: F401  (CPU defaults)
from ldm.atomic import save_image, write_text
from ldm.data.transforms import load_rgb

SOURCE = Path(__file__).resolve().parents[2] / "models/tiny_sd/data/blueprint_train"
SHAPES = ((64, 64), (96, 64), (64, 96))
CAPTION = re.compile(r"^(a blueprint drawing) of (.*) \((.*)\)$")


def tags(caption: str) -> str:
    """``a blueprint drawing of X (c1, c2)`` -> ``a blueprint drawing, X, c1, c2``; other captions unchanged."""
    match = CAPTION.match(caption)
    return ", ".join(match.groups()) if match else caption


def pad_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` centred on a canvas of ``size`` filled with its top-left pixel's colour."""
    canvas = Image.new("RGB", size, img.getpixel((0, 0)))
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return canvas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (its N_name subfolders are replaced)")
    parser.add_argument("--count", type=int, default=48, help="images to take from the shipped set")
    args = parser.parse_args(argv)
    lines = (SOURCE / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[: args.count]
    folders = [Path(args.out) / "2_blueprint drawing", Path(args.out) / "1_blueprint drawing"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(lines):
        item = json.loads(line)
        folder = folders[0] if i < len(lines) // 2 else folders[1]
        stem = Path(item["file_name"]).stem
        save_image(folder / f"{stem}.png", pad_to(load_rgb(SOURCE / item["file_name"]), SHAPES[i % len(SHAPES)]))
        write_text(folder / f"{stem}.txt", tags(item["text"]) + "\n")
    print(f"{len(lines)} images in {', '.join(str(f) for f in folders)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
