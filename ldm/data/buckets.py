"""Aspect-ratio buckets with the semantics of kohya sd-scripts' ``enable_bucket``.

A bucket is a training resolution ``(width, height)``; every batch holds images of one bucket, so portraits and
landscapes train whole instead of being cropped square. The bucket set (``bucket_resolutions``) holds the square of
side ``floor(sqrt(max_area) / steps) * steps`` and, for each width ``w`` from ``min_reso`` to ``max_reso`` in
``steps``, the pair ``(w, h)`` and ``(h, w)`` with ``h = min(max_reso, floor(floor(max_area / w) / steps) * steps)``
when ``h >= min_reso``. An image goes to the bucket of nearest aspect ratio (its own size if that is a bucket), is
scaled so that it covers the bucket (``int(side * scale + 0.5)``) and cropped to it (centred, or uniformly at random
with ``random_crop``; :func:`ldm.data.transforms.fit_to_bucket`).

With ``no_upscale`` (kohya's ``bucket_no_upscale``) the bucket comes from the image itself: an image larger than
``max_area`` is first scaled down to about ``max_area`` keeping its aspect ratio (rounding either side to ``steps``,
whichever keeps the ratio closer); then each side is cut down to a multiple of ``steps``. Images are never enlarged,
so the set of buckets is whatever the data produces.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]  # (width, height) in pixels, PIL's order


def bucket_resolutions(max_area: int, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """kohya's predefined bucket set for a maximum area (``make_bucket_resolutions``), sorted."""
    sizes = set()
    side = int(math.sqrt(max_area) // steps) * steps
    sizes.add((side, side))
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, int((max_area // width) // steps) * steps)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket and the size it is resized to before the crop (covers the bucket)."""

    bucket: Size
    resized: Size


@dataclass(frozen=True)
class BucketSpec:
    """The bucket options: ``resolution`` (W, H) whose area is the maximum, side bounds, step, no-upscale mode."""

    resolution: Size
    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False

    def __post_init__(self):
        w, h = self.resolution
        if self.steps < 1 or w < 1 or h < 1:
            raise ValueError(f"bucket_reso_steps and resolution must be positive, got {self.steps}, {w}x{h}")
        if self.min_reso > min(w, h):
            raise ValueError(f"min_bucket_reso {self.min_reso} is larger than the resolution {w}x{h}")
        if self.max_reso < max(w, h):
            raise ValueError(f"max_bucket_reso {self.max_reso} is smaller than the resolution {w}x{h}")

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def predefined(self) -> list[Size]:
        """The bucket set images are matched to (without ``no_upscale``)."""
        return bucket_resolutions(self.max_area, self.min_reso, self.max_reso, self.steps)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def place(self, width: int, height: int, buckets: list[Size] | None = None) -> Placement:
        """The bucket and resize of a ``width`` x ``height`` image; ``buckets`` is :meth:`predefined` (pass it
        in to place many images). ``ValueError`` if ``no_upscale`` leaves a side below ``steps``."""
        ratio = width / height
        if not self.no_upscale:
            buckets = self.predefined() if buckets is None else buckets
            bucket = (width, height)
            if bucket not in buckets:
                errors = np.abs(np.array([w / h for w, h in buckets]) - ratio)
                bucket = buckets[int(errors.argmin())]
            return cover(width, height, bucket)
        resized = (width, height)
        if width * height > self.max_area:
            scaled_w = math.sqrt(self.max_area * ratio)
            scaled_h = self.max_area / scaled_w
            w_first = self._round(scaled_w)
            h_of_w = max(self.steps, self._round(w_first / ratio))
            h_first = self._round(scaled_h)
            w_of_h = max(self.steps, self._round(h_first * ratio))
            if abs(w_first / h_of_w - ratio) < abs(w_of_h / h_first - ratio):
                resized = (w_first, int(w_first / ratio + 0.5))
            else:
                resized = (int(h_first * ratio + 0.5), h_first)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(bucket) < self.steps:
            raise ValueError(
                f"a {width}x{height} image is smaller than one bucket step ({self.steps}) on a side with "
                "bucket_no_upscale"
            )
        return Placement(bucket, resized)


def cover(width: int, height: int, bucket: Size) -> Placement:
    """A ``width`` x ``height`` image placed into ``bucket``: scaled, keeping its aspect ratio, to the smallest size
    that covers the bucket (the crop then cuts the excess of one side)."""
    scale = bucket[1] / height if width / height > bucket[0] / bucket[1] else bucket[0] / width
    return Placement(tuple(bucket), (int(width * scale + 0.5), int(height * scale + 0.5)))


def bucket_table(placements: Iterable[Placement]) -> str:
    """The log's bucket table: one line per bucket (resolution, aspect ratio, number of images), as kohya prints."""
    counts = Counter(p.bucket for p in placements)
    lines = [f"{'bucket':>6}  {'resolution':>11}  {'ratio':>6}  images"]
    for i, (w, h) in enumerate(sorted(counts)):
        lines.append(f"{i:>6}  {f'{w}x{h}':>11}  {w / h:>6.3f}  {counts[(w, h)]}")
    return "\n".join(lines)
