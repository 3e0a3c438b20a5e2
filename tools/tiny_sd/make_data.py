"""Build the tiny-SD image-caption set from Debian's public-domain ``openclipart-png`` package.

    apt-get install openclipart-png
    python tools/tiny_sd/make_data.py [--src /usr/share/openclipart/png] [--out output/tiny_sd_data] [--size 64]

Every PNG is composited on white, padded to a square and resized to ``--size``. Its caption comes from the file name
(trailing numbers and separators removed) and its folder: ``"a clip art drawing of a penguin (birds, animals)"``.

The held-out concept (``--concept``, default ``HELD_OUT``) is a colour treatment from ``CONCEPTS``: *blueprint*
(white drawing on a dark-blue ground, the demo's) or *night vision* (green on near-black, tried; see the model card).
A seeded 10% of the images are set aside, redrawn in the concept's colours (:func:`treat`) and captioned with its
phrase (``"a blueprint drawing of ..."``); the tiny UNet never sees them and LoRA learns them in ``make demo``. Splits:

* ``base_train.npz`` - images (uint8 NHWC) and token ids of every other image but 5% (plain captions and the same
  subjects under the concept's phrase, ``held_out_ids``), for training the tiny models;
* ``base_test/`` - that 5% (images + ``metadata.jsonl``), for the model card's FID of the base model;
* ``<concept>_train/`` - 200 held-out images + ``metadata.jsonl`` (the LoRA training set the demo commits);
* ``<concept>_test/`` - the remaining held-out images + ``metadata.jsonl`` (FID reference of the demo).

The split does not depend on the concept, so every colour treatment holds out the same images. A subject category
from ``CATEGORIES`` (``--concept flags``, tried; see the model card) instead holds out every drawing under its folder,
untreated and with its ordinary caption; ``held_out_ids`` are then the captions of ``<concept>_train``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

CAPTION = "a clip art drawing of {}"
CATEGORIES = {  # held-out subject categories: name -> folder under --src (every drawing below it is held out)
    "flags": "signs_and_symbols/flags",
}
CONCEPTS = {  # held-out colour treatments of a drawing's ink: name -> (caption, paper RGB, ink RGB)
    "blueprint": ("a blueprint drawing of {}", (24, 56, 140), (255, 255, 255)),
    "night_vision": ("a night vision drawing of {}", (10, 30, 10), (60, 255, 60)),
}
HELD_OUT = "blueprint"  # the concept held out of the base UNet and taught by the demo's LoRA
HELD_OUT_FRACTION = 0.10
BASE_TEST_FRACTION = 0.05
HELD_OUT_TRAIN_COUNT = 200


def ink(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] drawings on white -> ink in [0, 1], [..., H, W, 1]: darkness (1 - luma), boosted so thin
    lines and pale fills show clearly."""
    rgb = images.astype(np.float32) / 255.0
    darkness = 1.0 - (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    return np.clip(darkness * 1.5, 0.0, 1.0)[..., None]


def paint(drawing_ink: np.ndarray, paper, colour) -> np.ndarray:
    """Ink in [0, 1] -> uint8 RGB: ``colour`` ink on ``paper`` (either one RGB or per-pixel, e.g. the drawing's own)."""
    out = np.asarray(paper, np.float32) * (1.0 - drawing_ink) + np.asarray(colour, np.float32) * drawing_ink
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def treat(images: np.ndarray, concept: str = HELD_OUT) -> np.ndarray:
    """uint8 [..., H, W, 3] drawings on white -> the same drawings in ``concept``'s colours."""
    _, paper, colour = CONCEPTS[concept]
    return paint(ink(images), paper, colour)


def subject(path: Path, root: Path) -> str:
    """``animals/birds/penguin_tux_01.png`` -> ``"penguin tux (birds, animals)"``."""
    stem = re.sub(r"[_\-\s]*\d*$", "", path.stem)
    words = [w for w in re.split(r"[_\-\s.]+", stem.lower()) if w and not w.isdigit()]
    folders = [f.replace("_", " ") for f in reversed(path.parent.relative_to(root).parts)]
    name = " ".join(words) or folders[0]
    return f"{name} ({', '.join(folders)})"


def load_square(path: Path, size: int) -> np.ndarray | None:
    """RGBA/any PNG -> uint8 [size, size, 3] on white, aspect kept by padding; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # unreadable, or too large to decode safely
    side = max(img.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(img, ((side - img.width) // 2, (side - img.height) // 2))
    return np.asarray(canvas.convert("RGB").resize((size, size), Image.LANCZOS), np.uint8)


def write_split(folder: Path, images: np.ndarray, captions: list[str]) -> None:
    """PNG files + diffusers-style ``metadata.jsonl`` (``file_name``, ``text``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        name = f"{i:04d}.png"
        Image.fromarray(image).save(folder / name, optimize=True)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default="/usr/share/openclipart/png", help="root of the openclipart-png images")
    p.add_argument("--out", default="output/tiny_sd_data")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--concept",
        default=HELD_OUT,
        choices=sorted(CONCEPTS) + sorted(CATEGORIES),
        help="the held-out colour treatment or subject category",
    )
    args = p.parse_args(argv)
    root = Path(args.src)
    paths = sorted(root.rglob("*.png"))
    if not paths:
        print(f"error: no PNG files under {root} (apt-get install openclipart-png)", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; remove it or pick another --out", file=sys.stderr)
        return 2

    images, subjects, in_category = [], [], []
    category = CATEGORIES.get(args.concept)
    for path in paths:
        image = load_square(path, args.size)
        if image is None:
            print(f"skipped unreadable {path}", file=sys.stderr)
            continue
        images.append(image)
        subjects.append(subject(path, root))
        in_category.append(category is not None and path.relative_to(root).as_posix().startswith(category + "/"))
    images = np.stack(images)
    order = np.random.default_rng(args.seed).permutation(len(images))
    if category:  # every drawing of the category, in the seeded order
        held_mask = np.asarray(in_category)[order]
        held, rest = order[held_mask], order[~held_mask]
    else:
        n_held = int(round(HELD_OUT_FRACTION * len(images)))
        held, rest = order[:n_held], order[n_held:]
    n_test = int(round(BASE_TEST_FRACTION * len(rest)))
    base_test, base_train = rest[:n_test], rest[n_test:]
    held_train, held_test = held[:HELD_OUT_TRAIN_COUNT], held[HELD_OUT_TRAIN_COUNT:]
    held_caption = CAPTION if category else CONCEPTS[args.concept][0]

    from ldm.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.for_family("sd1")
    train_subjects = [subjects[i] for i in base_train]
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "base_train.npz",
        images=images[base_train],
        ids=tokenizer([CAPTION.format(s) for s in train_subjects]),
        held_out_ids=tokenizer(  # a category: its LoRA training captions (what the base model draws for them)
            [CAPTION.format(subjects[i]) for i in held_train]
            if category
            else [held_caption.format(s) for s in train_subjects]
        ),
        concept=np.array(args.concept),
        empty_ids=tokenizer([""]),
    )
    write_split(out / "base_test", images[base_test], [CAPTION.format(subjects[i]) for i in base_test])
    splits = {f"{args.concept}_train": held_train, f"{args.concept}_test": held_test}
    for name, idx in splits.items():
        held_images = images[idx] if category else treat(images[idx], args.concept)
        write_split(out / name, held_images, [held_caption.format(subjects[i]) for i in idx])
    counts = {"base_train": len(base_train), "base_test": len(base_test)}
    counts.update({name: len(idx) for name, idx in splits.items()})
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    sys.exit(main())
