"""Cached training inputs: each image's VAE posterior and each caption's text context, computed once before training
(kohya's ``cache_latents`` and ``cache_text_encoder_outputs``), so the step runs the UNet alone.

Equal to the uncached run. The cache keeps the posterior's moments (mean and clamped log-variance), not a sample: the
trainer still draws each step's posterior noise from the same stream and forms ``mean + exp(logvar / 2) * noise`` as
the uncached step does. With ``random_flip`` every image is encoded in both orientations and a sample takes the one
its flip draw selects (the draw :meth:`ImageCaptionSource.image` makes, from the same generator). Captions: every
caption of every cached record with its subset's prefix and suffix, plus ``""`` when caption dropout is on; a
sample's caption is chosen exactly as in the uncached source. A random crop, and captions whose tags are shuffled or
dropped, differ at every visit and cannot be cached (training options turn the cache off). With aspect-ratio buckets
each image's moments have its bucket's shape; an image repeated by its folder (``N_name``) is encoded once per
bucket it trains in.

Only the records this rank's sampler will still visit are encoded: its shard of the remaining epochs. Epochs are
reshuffled across ranks (that keeps N ranks equal to one process with the global batch), so a run of several epochs
visits, and caches, most records on every rank. Each image and caption is encoded alone (batch 1), so a cached value
does not depend on which others were cached with it: a resumed run rebuilds the cache with the values it had.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the dataset module builds caches, so it is imported here for annotations only
    from ldm.data.dataset import ImageCaptionSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEncoders:
    """The frozen encoders a cache is built with (numpy in, numpy out); ``None`` leaves that input uncached.

    images: ``[1, 3, S, S]`` image in [-1, 1] -> ``[1, 2C, h, w]`` posterior moments (mean, then log-variance).
    texts: ``[caption]`` -> ``[1, L, D]`` text context.
    """

    images: Callable[[np.ndarray], np.ndarray] | None = None
    texts: Callable[[list[str]], np.ndarray] | None = None


class CachedSource:
    """A source like :class:`ImageCaptionSource` whose samples come from the cache where it has them.

    ``moments[latent_rows[index]]`` holds record ``index``'s moments for each flip, ``[flips, 2C, h, w]``.

    Sample id -> ``(moments [2C, h, w], context [L, D])``; an input that is not cached comes from ``source`` as
    before (``image [3, S, S]`` or ``tokens [L]``). ``column_names`` says which.
    """

    def __init__(
        self,
        source: ImageCaptionSource,
        moments: list[np.ndarray] | None,
        latent_rows: dict[int, int],
        contexts: np.ndarray | None,
        context_rows: dict[str, int],
    ):
        self.source = source
        self.moments, self.latent_rows = moments, latent_rows
        self.contexts, self.context_rows = contexts, context_rows
        self.column_names = (
            "image" if moments is None else "moments",
            "tokens" if contexts is None else "context",
        )

    def __len__(self) -> int:
        return len(self.source)

    @property
    def nbytes(self) -> int:
        """Memory the cached arrays take."""
        return sum(a.nbytes for a in [*(self.moments or []), self.contexts] if a is not None)

    def __getitem__(self, sample_id):
        source = self.source
        if self.moments is None:
            first = source.image(sample_id)
        else:
            row = self.latent_rows[int(sample_id) % len(source)]
            first = self.moments[row][int(source.mirrored(sample_id))]
        text = source.caption(sample_id)
        if self.contexts is None:
            second = np.asarray(source.tokenizer([text]), dtype=np.int32)[0]
        else:
            second = self.contexts[self.context_rows[text]]
        return first, second


def records_to_visit(sample_ids: Iterable[int], num_records: int) -> list[int]:
    """The sorted record indices behind a sampler's sample ids (``epoch * N + index``)."""
    ids = np.fromiter(sample_ids, dtype=np.int64)
    return np.unique(ids % num_records).tolist()


def captions_to_cache(source: ImageCaptionSource, indices: Iterable[int]) -> list[str]:
    """Every text these records can train on (captions with prefix/suffix, ``""`` under caption dropout), sorted."""
    return sorted({text for i in indices for text in source.record_captions(i)})


def _image_key(source: ImageCaptionSource, index: int) -> tuple:
    """What record ``index``'s encoded image depends on: its file and its bucket placement (a DreamBooth class image
    can train in several buckets)."""
    placements = source.placements
    return source.records[index].path, None if placements is None else placements[index]


def build_cache(
    source: ImageCaptionSource, sample_ids: Iterable[int], encoders: CacheEncoders, progress: bool = True
) -> CachedSource:
    """Encode the records and captions that ``sample_ids`` (this rank's remaining ones) use; logs the time taken and
    the memory the cache holds, with a progress bar when ``progress``."""
    from tqdm import tqdm

    indices = records_to_visit(sample_ids, len(source))
    flips = (False, True) if source.transform.flip and encoders.images is not None else (False,)
    texts = captions_to_cache(source, indices) if encoders.texts is not None else []
    first: dict[tuple, int] = {}  # (image path, placement) -> the first record index showing it, in row order
    for index in indices:
        first.setdefault(_image_key(source, index), index)
    row_of = {key: row for row, key in enumerate(first)}
    images = len(first) * len(flips) if encoders.images is not None else 0
    start = time.perf_counter()
    with tqdm(total=images + len(texts), desc="cache", unit="input", disable=not progress) as bar:
        moments = None
        if encoders.images is not None:
            moments = []
            for index in first.values():
                per_flip = []
                for mirrored in flips:
                    image = source.record_image(index, mirrored)[None]
                    per_flip.append(np.asarray(encoders.images(image), dtype=np.float32)[0])
                    bar.update(1)
                moments.append(np.stack(per_flip))
        contexts = None
        if encoders.texts is not None:
            encoded = []
            for text in texts:
                encoded.append(np.asarray(encoders.texts([text]), dtype=np.float32)[0])
                bar.update(1)
            contexts = np.stack(encoded)
    cached = CachedSource(
        source,
        moments,
        {index: row_of[_image_key(source, index)] for index in indices} if moments is not None else {},
        contexts,
        {text: row for row, text in enumerate(texts)},
    )
    parts = [f"{images} latents ({len(first)} images x {len(flips)} flips)"] if moments is not None else []
    parts += [f"{len(texts)} text contexts"] if contexts is not None else []
    logger.info(
        "cached %s in %.1f s; the cache holds %.1f MiB",
        " and ".join(parts),
        time.perf_counter() - start,
        cached.nbytes / 2**20,
    )
    return cached
