"""Image transforms for text-to-image fine-tuning: shorter-side resize, crop, flip, CHW float32 in [-1, 1].

This is the diffusers ``train_text_to_image_lora.py`` pipeline (``Resize(resolution)`` + ``CenterCrop``/``RandomCrop``
+ ``RandomHorizontalFlip`` + ``Normalize([0.5], [0.5])``) in PIL/numpy. Resizing uses PIL's Lanczos filter by
default, as diffusers' ``--image_interpolation_mode=lanczos`` does (MindONE uses bilinear); PIL filters antialias when
downscaling. The longer side becomes ``int(size * long / short)`` like torchvision's ``Resize``. Randomness comes from
a ``numpy.random.Generator`` passed in, so a sample's augmentation is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_rgb(path) -> Image.Image:
    """Decode an image file as 8-bit RGB, applying its EXIF orientation (see :func:`to_rgb8`)."""
    with Image.open(path) as img:
        return to_rgb8(ImageOps.exif_transpose(img))


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, scaling high-bit-depth pixels instead of letting PIL clip them to 255.

    ``I;16*`` and ``I`` (16-bit PNG/TIFF/PGM) are read as 0..65535 and ``F`` as 0..1 (values outside are clipped);
    other values are an error. Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) is dropped as diffusers'
    and kohya's training scripts do; ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` convert with PIL's own formulas.
    """
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise ValueError(f"mode {mode} pixel values {wide.min()}..{wide.max()} are outside 0..65535")
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        real = np.asarray(img, dtype=np.float64)
        if not np.isfinite(real).all():
            raise ValueError("mode F image has NaN or infinite pixel values")
        gray = np.rint(np.clip(real, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int, interpolation: str = "lanczos") -> Image.Image:
    """Scale so that the shorter side is ``size`` (aspect ratio kept; the longer side is truncated as torchvision)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def crop_box(width: int, height: int, size: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a ``size`` square: centred (torchvision rounding) or uniform when ``rng``."""
    if width < size or height < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    if rng is None:
        left = int(round((width - size) / 2.0))
        top = int(round((height - size) / 2.0))
    else:
        left = int(rng.integers(0, width - size + 1))
        top = int(rng.integers(0, height - size + 1))
    return left, top, left + size, top + size


def to_chw_float(img: Image.Image) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW in [-1, 1] (``x / 127.5 - 1``)."""
    arr = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0))


def fit_to_bucket(
    img: Image.Image,
    resized: tuple[int, int],
    bucket: tuple[int, int],
    rng: np.random.Generator | None,
    interpolation: str = "lanczos",
) -> Image.Image:
    """Resize ``img`` to ``resized`` (width, height) and crop ``bucket`` out of it (aspect-ratio buckets, see
    :mod:`ldm.data.buckets`): centred at ``excess // 2`` as kohya does, or, given ``rng``, at a uniform offset (left
    drawn first, then top)."""
    if img.size != tuple(resized):
        img = img.resize(tuple(resized), INTERPOLATIONS[interpolation])
    (w, h), (bw, bh) = img.size, bucket
    if bw > w or bh > h:
        raise ValueError(f"cannot crop {bw}x{bh} from a {w}x{h} image")
    if rng is None:
        left, top = (w - bw) // 2, (h - bh) // 2
    else:
        left, top = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    return img.crop((left, top, left + bw, top + bh))


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``size``, crop a square (random or centred), flip with probability 1/2.

    Given a ``placement`` (an aspect-ratio bucket, :class:`ldm.data.buckets.Placement`) the image is resized to
    ``placement.resized`` and cropped to ``placement.bucket`` instead; ``size`` is then unused.
    """

    size: int
    random_crop: bool = False
    flip: bool = False
    interpolation: str = "lanczos"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")

    def __call__(self, img: Image.Image, rng: np.random.Generator, placement=None) -> np.ndarray:
        return self._finish(self._crop(img, rng if self.random_crop else None, placement), self.draw_flip(rng))

    def _crop(self, img: Image.Image, rng: np.random.Generator | None, placement) -> Image.Image:
        if placement is not None:
            return fit_to_bucket(img, placement.resized, placement.bucket, rng, self.interpolation)
        img = resize_shorter_side(img, self.size, self.interpolation)
        return img.crop(crop_box(img.width, img.height, self.size, rng))

    def draw_flip(self, rng: np.random.Generator) -> bool:
        """Whether a sample is mirrored: one draw from ``rng`` (after the crop's draws) when ``flip`` is on."""
        return self.flip and rng.random() < 0.5

    def centred(self, img: Image.Image, mirrored: bool, placement=None) -> np.ndarray:
        """The centre crop, mirrored or not: what a sample becomes without random crop, for a given flip draw
        (the cache encodes both versions of each image)."""
        if self.random_crop:
            raise ValueError("centred() has no random crop to reproduce; it serves transforms without random_crop")
        return self._finish(self._crop(img, None, placement), mirrored)

    @staticmethod
    def _finish(img: Image.Image, mirrored: bool) -> np.ndarray:
        if mirrored:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_chw_float(img)
