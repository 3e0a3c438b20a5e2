"""Image-caption datasets for fine-tuning, as a random-access source plus a sharded, resumable sampler.

Layouts (detected from the folder ``data_path``, or given by a kohya ``dataset_config``):

* MindONE: ``img_txt.csv`` with columns ``dir,text``; ``dir`` is relative to ``data_path``.
* diffusers imagefolder: ``metadata.jsonl``, one JSON object per line with ``file_name`` (relative) and ``text``
  (a string, or a list of captions of which one is drawn per sample).
* kohya: images with caption sidecars, in ``N_name`` subfolders repeated N times per epoch (:mod:`ldm.data.kohya`).

Malformed or empty index files are errors naming file and line. Missing or undecodable images (checked with PIL
``verify`` when scanning) are logged with their count and paths and skipped; if nothing is left, ``ValueError`` names
``data_path``. With aspect-ratio buckets (:mod:`ldm.data.buckets`) every image is resized and cropped into its bucket
and every batch holds one bucket (:class:`ldm.data.sampler.BucketSampler`).

Randomness and resume. Every sample is addressed by a *sample id* ``epoch * N + index``. Its crop, flip, caption
choice, caption dropout, tag shuffle and tag dropout come from ``numpy.random.default_rng([seed, epoch, index,
stream])`` and an epoch's order from ``default_rng([seed, epoch])``, so a sample is identical whichever worker or
rank produces it and however often the pipeline is rebuilt. The sampler yields the ids of a whole run
(``num_epochs`` epochs, each split over ranks) in one pass. To resume after a rank consumed ``k`` batches, rebuild
with ``batches_done=k``: the remaining batches come out exactly as they would have without the interruption (given
the same seed, data, batch size and world size).

A run reads its data once (:class:`TrainingData`: sources scanned, buckets placed); the trainer takes the epoch's
size and the bucket order from its sampler, then builds the one pipeline (:func:`build_pipeline`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from ldm.data.buckets import BucketSpec, Placement, Size, bucket_table, cover
from ldm.data.cache import CacheEncoders, build_cache
from ldm.data.captions import CaptionRules
from ldm.data.kohya import FolderOptions, read_records
from ldm.data.records import Record
from ldm.data.sampler import RunOrder, ShardedSampler
from ldm.data.transforms import ImageTransform, load_rgb

logger = logging.getLogger(__name__)

_SHOWN = 10
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that exif_transpose turns by 90 degrees


def _image_info(path: str, sizes: dict) -> str | None:
    """``None`` if the image at ``path`` passes PIL ``verify`` (its upright size then goes to ``sizes[path]``),
    else why not."""
    if path in sizes:
        return None
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:  # verify leaves the file unusable; the header is read again
            size, orientation = img.size, img.getexif().get(0x0112)
    except Exception as err:  # PIL raises many types for bad files
        return f"corrupt ({type(err).__name__}: {err})"
    sizes[path] = size[::-1] if orientation in _SWAPS_SIDES else size
    return None


def scan_dataset(data_path: str, label: str, records: list[Record]) -> tuple[list[Record], list[tuple[str, str]], dict]:
    """Records whose image exists and passes PIL ``verify``, ``(path, reason)`` for the ones skipped, and each good
    image's upright ``(width, height)`` by path. ``label`` (the index file, folder or dataset config the records
    come from) names the data in messages."""
    good, skipped, sizes = [], [], {}
    for record in records:
        problem = _image_info(record.path, sizes)
        if problem is None:
            good.append(record)
        else:
            skipped.append((record.path, problem))
    if skipped:
        shown = "; ".join(f"{p}: {why}" for p, why in skipped[:_SHOWN])
        more = f"; ... {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
        logger.warning("%s: skipped %d of %d images: %s%s", label, len(skipped), len(records), shown, more)
    if not good:
        raise ValueError(
            f"{data_path or label}: no usable images ({len(skipped)} listed in {label} are missing or corrupt)"
        )
    return good, skipped, sizes


def place_in_buckets(records: list[Record], sizes: dict, spec: BucketSpec) -> list[Placement]:
    """Each record's bucket. Images smaller than ``min_reso`` on a side are named in one warning (they are
    enlarged), or refused with ``no_upscale`` (their bucket would fall below the minimum)."""
    buckets = None if spec.no_upscale else spec.predefined()
    small = sorted({r.path for r in records if min(sizes[r.path]) < spec.min_reso})
    if small and spec.no_upscale:
        w, h = sizes[small[0]]
        raise ValueError(
            f"{small[0]}: {w}x{h} is smaller than min_bucket_reso {spec.min_reso} and bucket_no_upscale keeps it "
            f"that small ({len(small)} such images); remove them or turn bucket_no_upscale off"
        )
    if small:
        more = f", ... {len(small) - _SHOWN} more" if len(small) > _SHOWN else ""
        logger.warning(
            "%d images are smaller than min_bucket_reso %d on a side and are enlarged into their bucket: %s%s",
            len(small),
            spec.min_reso,
            ", ".join(small[:_SHOWN]),
            more,
        )
    placed: dict[str, Placement] = {}
    for record in records:
        if record.path not in placed:
            placed[record.path] = spec.place(*sizes[record.path], buckets)
    return [placed[r.path] for r in records]


SPLIT_STREAM = (0, 0x5A11)  # appended to the seed: the validation split's own generator (no other key has 3 parts)


def split_records(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """``(training, held out)``: ``round(fraction * N)`` of the N distinct images (at least 1 when ``fraction > 0``),
    drawn by ``seed``, are held out for the validation loss, with every record of them (a kohya ``N_name`` folder
    repeats records), so no held-out image is trained on; held out: one record per image. The same seed and data give
    the same split on every rank and on resume."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(records), []
    paths = list(dict.fromkeys(r.path for r in records))
    count = max(1, round(fraction * len(paths)))
    if count >= len(paths):
        raise ValueError(f"validation_split {fraction} holds out all {len(paths)} images; none are left to train on")
    order = np.random.default_rng([seed, *SPLIT_STREAM]).permutation(len(paths))
    held = {paths[i] for i in order[:count].tolist()}
    first = {r.path: r for r in reversed(records)}
    return [r for r in records if r.path not in held], [first[p] for p in paths if p in held]


class ImageCaptionSource:
    """Random-access source: sample id ``epoch * len(self) + index`` -> ``(image CHW float32, tokens int32 [77])``.

    Without a tokenizer the second item is the caption string. ``caption_dropout`` replaces the caption by ``""``
    with that probability (for classifier-free guidance); ``captions`` holds the other caption rules of an index
    file's records (a dataset config's subsets bring their own), ``folder`` says how to read a kohya folder or
    dataset config. With ``buckets`` each image is resized and cropped into its aspect-ratio bucket
    (``self.placements``) instead of a square of ``image_size``. An image that fails to decode at load time is logged
    and replaced by the next record (of the same bucket), so a batch never breaks. ``validation_split`` leaves out
    the images :func:`split_records` holds out for the validation loss. ``records`` given are used instead of
    reading ``data_path`` (still checked, as read ones are), under ``subset_rules`` (one per ``Record.subset``) or
    the one set of caption rules. ``bucket_of`` (with ``buckets``) puts record ``i`` into the bucket
    ``bucket_of[i]`` (resized to cover it) instead of the bucket of nearest aspect ratio: DreamBooth's class image
    trains at its pair's bucket. ``draw_key`` extends every sample's generator key, so that a second source read at
    the same sample ids (DreamBooth's class half) draws independently of the first.
    """

    column_names = ("image", "tokens")

    def __init__(
        self,
        data_path,
        tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None,
        image_size: int = 512,
        random_crop: bool = False,
        flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        interpolation: str = "lanczos",
        *,
        captions: CaptionRules | None = None,
        folder: FolderOptions | None = None,
        buckets: BucketSpec | None = None,
        validation_split: float = 0.0,
        records: list[Record] | None = None,
        subset_rules: list[CaptionRules] | None = None,
        bucket_of: Sequence[Size] | None = None,
        draw_key: tuple[int, ...] = (),
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        rules = replace(captions or CaptionRules(), caption_dropout_rate=float(caption_dropout))
        self.data_path = os.fspath(data_path)
        if records is None:
            self.label, records, self.rules = read_records(data_path, folder or FolderOptions(), rules)
        else:  # given by the caller (DreamBooth's instance and class halves)
            self.label, self.rules = self.data_path, subset_rules or [rules]
        self.records, self.skipped, sizes = scan_dataset(self.data_path, self.label, records)
        self.records = split_records(self.records, validation_split, seed)[0]
        self.placements = None
        if buckets is not None and bucket_of is None:
            self.placements = place_in_buckets(self.records, sizes, buckets)
        elif buckets is not None:
            if len(bucket_of) != len(self.records):
                raise ValueError(f"{self.label}: {len(bucket_of)} buckets given for {len(self.records)} records")
            self.placements = [cover(*sizes[r.path], b) for r, b in zip(self.records, bucket_of, strict=True)]
        self.tokenizer = tokenizer
        self.transform = ImageTransform(image_size, random_crop, flip, interpolation)
        self.seed, self.draw_key = int(seed), tuple(draw_key)

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, sample_id: int, stream: int) -> np.random.Generator:
        epoch, index = divmod(int(sample_id), len(self.records))
        return np.random.default_rng([self.seed, epoch, index, stream, *self.draw_key])

    def caption(self, sample_id: int) -> str:
        """The training text of a sample: one of its captions, through its subset's :class:`CaptionRules`."""
        rng = self._rng(sample_id, 1)
        record = self.records[int(sample_id) % len(self.records)]
        pick = int(rng.integers(len(record.captions))) if len(record.captions) > 1 else 0
        return self.rules[record.subset].apply(record.captions[pick], rng)

    def record_captions(self, index: int) -> set[str]:
        """Every text record ``index`` can train on when its rules shuffle and drop no tags (for the text cache)."""
        record = self.records[index]
        rules = self.rules[record.subset]
        if rules.varies:
            raise ValueError("shuffled or tag-dropped captions differ at each visit; the text cache refuses them")
        return {rules.fixed(c) for c in record.captions} | ({""} if rules.caption_dropout_rate > 0 else set())

    def bucket(self, index: int) -> tuple[int, int] | None:
        """Record ``index``'s bucket (width, height), or ``None`` without buckets."""
        return None if self.placements is None else self.placements[index].bucket

    def _decode(self, index: int):
        """``(PIL image, record index)``: record ``index``'s image, or that of a following record of the same
        bucket if it cannot be decoded."""
        n = len(self.records)
        for offset in range(n):
            other = (index + offset) % n
            if self.bucket(other) != self.bucket(index):
                continue
            path = self.records[other].path
            try:
                return load_rgb(path), other
            except Exception as err:  # PIL raises many types for bad files
                logger.error("cannot decode %s (%s: %s); using the next image", path, type(err).__name__, err)
        raise ValueError(f"{self.data_path}: no image could be decoded")

    def _placement(self, index: int) -> Placement | None:
        return None if self.placements is None else self.placements[index]

    def image(self, sample_id: int) -> np.ndarray:
        """The transformed image of a sample, falling back to following records if it cannot be decoded."""
        img, index = self._decode(int(sample_id) % len(self.records))
        return self.transform(img, self._rng(sample_id, 0), self._placement(index))

    def mirrored(self, sample_id: int) -> bool:
        """Whether :meth:`image` flips this sample (the same draw from the same generator; no random crop)."""
        if self.transform.random_crop:
            raise ValueError("the flip of a randomly cropped sample depends on its crop; cached inputs refuse it")
        return self.transform.draw_flip(self._rng(sample_id, 0))

    def record_image(self, index: int, mirrored: bool) -> np.ndarray:
        """Record ``index``'s image as :meth:`image` gives it for a sample drawing ``mirrored`` (no random crop)."""
        img, index = self._decode(int(index))
        return self.transform.centred(img, mirrored, self._placement(index))

    def __getitem__(self, sample_id):
        image = self.image(sample_id)
        text = self.caption(sample_id)
        if self.tokenizer is None:
            return image, text
        tokens = np.asarray(self.tokenizer([text]), dtype=np.int32)[0]
        return image, tokens


class TrainingData:
    """A run's samples, read once (images checked, buckets placed), before any pipeline is built: one
    :class:`ImageCaptionSource`, or sources of equal length read at the same sample id and joined by ``combine``
    (DreamBooth's instance and class halves, :class:`ldm.data.dreambooth.DreamBoothSource`). The first source's
    buckets are the batches' buckets."""

    def __init__(self, sources: Sequence[ImageCaptionSource], combine: Callable | None = None, label: str = ""):
        if len({len(s) for s in sources}) != 1:
            raise ValueError(f"sources of one sample id must have one length, got {[len(s) for s in sources]}")
        self.sources, self.combine = list(sources), combine
        self.label = label or sources[0].label

    def __len__(self) -> int:
        return len(self.sources[0])

    @property
    def placements(self) -> list[Placement] | None:
        return self.sources[0].placements

    @property
    def bucket_table(self) -> str | None:
        """The table the trainer logs (resolution and sample count per bucket), ``None`` without buckets."""
        return None if self.placements is None else bucket_table(self.placements)

    def sampler(self, order: RunOrder) -> ShardedSampler:
        """This rank's sampler in ``order``: one bucket per batch with buckets (the sampler's ``digest`` is the
        bucket order), else a plain shard of each epoch."""
        try:
            return order.sampler(len(self), None if self.placements is None else [p.bucket for p in self.placements])
        except ValueError as err:
            raise ValueError(f"{self.label}: {err}") from None


def build_pipeline(
    data: TrainingData,
    order: RunOrder,
    num_workers: int = 1,
    python_multiprocessing: bool = False,
    cache: CacheEncoders | None = None,
):
    """The batched ``mindspore.dataset.GeneratorDataset`` of ``data`` over a whole run in ``order`` (see
    :func:`build_dataset`); with ``cache`` every source is cached on its own for the sample ids this rank will
    visit."""
    sampler = data.sampler(order)
    rank = order.rank
    sources = data.sources
    if cache is not None:
        sources = [build_cache(s, iter(sampler), cache, progress=rank == 0) for s in sources]
    samples = data.combine(*sources) if data.combine is not None else sources[0]
    dataset = generator_dataset(samples, list(samples.column_names), sampler, num_workers, python_multiprocessing)
    logger.info(
        "%s: %d samples per epoch; rank %d/%d gets %d per epoch, %d epochs, resuming after %d batches",
        data.label,
        len(data),
        rank,
        order.world_size,
        sampler.per_rank,
        order.num_epochs,
        order.batches_done,
    )
    bucketed = data.placements is not None
    batched = dataset.batch(order.batch_size, drop_remainder=order.drop_last or bucketed)
    batched.bucket_order = sampler.digest if bucketed else None
    batched.bucket_table = data.bucket_table
    return batched


def build_dataset(
    data_path,
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    image_size: int = 512,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    random_crop: bool = False,
    flip: bool = False,
    caption_dropout: float = 0.0,
    num_workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    num_epochs: int = 1,
    batches_done: int = 0,
    interpolation: str = "lanczos",
    python_multiprocessing: bool = False,
    cache: CacheEncoders | None = None,
    *,
    captions: CaptionRules | None = None,
    folder: FolderOptions | None = None,
    buckets: BucketSpec | None = None,
    validation_split: float = 0.0,
):
    """A batched ``mindspore.dataset.GeneratorDataset`` over a whole run of ``num_epochs`` epochs.

    Columns: ``image`` (B, 3, S, S) float32 in [-1, 1] and ``tokens`` (B, 77) int32. This rank gets its shard of
    every epoch (the sampler does the ``num_shards``/``shard_id`` split itself, since MindSpore's cannot be combined
    with a custom sampler). One pass over the returned dataset is the whole run; to resume, pass the number of
    batches this rank already consumed as ``batches_done``. ``num_workers`` is capped at the CPU count (MindSpore
    refuses more). With ``cache`` (see :mod:`ldm.data.cache`) the images and/or captions this rank will visit are
    encoded first, and the columns become ``moments`` (B, 2C, h, w) float32 and/or ``context`` (B, 77, D) float32.

    ``captions``, ``folder`` and ``buckets`` are :class:`ImageCaptionSource`'s. With ``buckets`` each batch holds one
    bucket (images (B, 3, H, W) of that bucket; every rank the same bucket at each step), every bucket's last batch
    is filled up with its own images, and ``drop_last`` is unused. The returned dataset's ``bucket_order`` is a
    digest of every record's bucket (``None`` without buckets): the trainer keeps it with the data position, so that
    a resume whose buckets differ is refused instead of visiting other batches; its ``bucket_table`` is the table the
    trainer logs (resolution and image count per bucket). ``validation_split`` leaves out the images held out for
    the validation loss (:func:`split_records`).
    """
    source = ImageCaptionSource(
        data_path,
        tokenizer,
        image_size,
        random_crop,
        flip,
        caption_dropout,
        seed,
        interpolation,
        captions=captions,
        folder=folder,
        buckets=buckets,
        validation_split=validation_split,
    )
    order = RunOrder(batch_size, shuffle, seed, rank, world_size, drop_last, num_epochs, batches_done)
    return build_pipeline(TrainingData([source]), order, num_workers, python_multiprocessing, cache)


def generator_dataset(samples, columns: list[str], sampler, num_workers: int = 1, python_multiprocessing=False):
    """``samples`` (random access by sample id) read in ``sampler``'s order, unbatched; ``num_workers`` is capped
    at the CPU count (MindSpore refuses more)."""
    import mindspore.dataset as msds

    workers = max(1, min(int(num_workers), os.cpu_count() or 1))
    if workers != num_workers:
        logger.warning("num_workers=%d capped to %d (CPU count)", num_workers, workers)
    return msds.GeneratorDataset(
        samples,
        column_names=columns,
        sampler=sampler,
        num_parallel_workers=workers,
        python_multiprocessing=python_multiprocessing,
    )
