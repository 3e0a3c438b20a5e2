"""Image-caption datasets for fine-tuning, as a random-access source plus a sharded, resumable sampler.

Layouts (detected from the folder ``data_path``):

* MindONE: ``img_txt.csv`` with columns ``dir,text``; ``dir`` is relative to ``data_path``.
* diffusers imagefolder: ``metadata.jsonl``, one JSON object per line with ``file_name`` (relative) and ``text``
  (a string, or a list of captions of which one is drawn per sample).

A folder with neither, or both, is an error naming the folder. Malformed or empty index files are errors naming file
and line. Missing or undecodable images (checked with PIL ``verify`` when scanning) are logged with their count and
paths and skipped; if nothing is left, ``ValueError`` names ``data_path``.

Randomness and resume. Every sample is addressed by a *sample id* ``epoch * N + index``. Its crop, flip, caption
choice and caption dropout come from ``numpy.random.default_rng([seed, epoch, index, stream])`` and an epoch's order
from ``default_rng([seed, epoch])``, so a sample is identical whichever worker or rank produces it and however often
the pipeline is rebuilt. :class:`ShardedSampler` yields the ids of a whole run (``num_epochs`` epochs, each split over
ranks) in one pass. To resume after a rank consumed ``k`` batches, rebuild with ``batches_done=k``: the remaining
batches come out exactly as they would have without the interruption (given the same seed, data, batch size and
world size).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm.data.cache import CacheEncoders, build_cache
from ldm.data.transforms import ImageTransform, load_rgb
from ldm.util import read_text_utf8

logger = logging.getLogger(__name__)

CSV_INDEX = "img_txt.csv"
JSONL_INDEX = "metadata.jsonl"
_SHOWN = 10


@dataclass(frozen=True)
class Record:
    """One training pair: an image path and one or more captions."""

    path: str
    captions: tuple[str, ...]


def _read_csv(path: str, root: str) -> list[Record]:
    with io.StringIO(read_text_utf8(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise ValueError(f"{path}: empty index file, expected a header 'dir,text'")
        header = [cell.strip() for cell in header]
        if "dir" not in header or "text" not in header:
            raise ValueError(f"{path}:1: header must have columns 'dir' and 'text', got {header}")
        i_dir, i_text = header.index("dir"), header.index("text")
        records = []
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}")
            rel = row[i_dir].strip()
            if not rel:
                raise ValueError(f"{path}:{reader.line_num}: empty 'dir'")
            records.append(Record(os.path.join(root, rel), (row[i_text],)))
    if not records:
        raise ValueError(f"{path}: no rows after the header")
    return records


def _read_jsonl(path: str, root: str) -> list[Record]:
    records = []
    with io.StringIO(read_text_utf8(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(item, dict) or "file_name" not in item or "text" not in item:
                raise ValueError(f"{path}:{line_no}: expected an object with 'file_name' and 'text'")
            text = item["text"]
            captions = tuple(text) if isinstance(text, list) else (text,)
            if not captions or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{path}:{line_no}: 'text' must be a string or a non-empty list of strings")
            records.append(Record(os.path.join(root, str(item["file_name"])), captions))
    if not records:
        raise ValueError(f"{path}: empty index file")
    return records


def read_index(data_path) -> tuple[str, list[Record]]:
    """Detect the layout of ``data_path`` and read its index: ``(index file, records)`` (images not checked)."""
    root = os.fspath(data_path)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: data path is not a directory")
    csv_path, jsonl_path = os.path.join(root, CSV_INDEX), os.path.join(root, JSONL_INDEX)
    has_csv, has_jsonl = os.path.isfile(csv_path), os.path.isfile(jsonl_path)
    if has_csv and has_jsonl:
        raise ValueError(f"{root}: has both {CSV_INDEX} and {JSONL_INDEX}; keep one")
    if has_csv:
        return csv_path, _read_csv(csv_path, root)
    if has_jsonl:
        return jsonl_path, _read_jsonl(jsonl_path, root)
    raise ValueError(
        f"{root}: no {CSV_INDEX} (MindONE layout, columns dir,text) or {JSONL_INDEX} "
        "(diffusers imagefolder, fields file_name,text) found"
    )


def _image_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # PIL raises many types for bad files
        return f"corrupt ({type(err).__name__}: {err})"
    return None


def scan_dataset(data_path) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records whose image exists and passes PIL ``verify``, and ``(path, reason)`` for the ones skipped."""
    index, records = read_index(data_path)
    good, skipped = [], []
    for record in records:
        problem = _image_problem(record.path)
        if problem is None:
            good.append(record)
        else:
            skipped.append((record.path, problem))
    if skipped:
        shown = "; ".join(f"{p}: {why}" for p, why in skipped[:_SHOWN])
        more = f"; ... {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
        logger.warning("%s: skipped %d of %d images: %s%s", index, len(skipped), len(records), shown, more)
    if not good:
        raise ValueError(
            f"{os.fspath(data_path)}: no usable images ({len(skipped)} listed in {index} are missing or corrupt)"
        )
    return good, skipped


class ImageCaptionSource:
    """Random-access source: sample id ``epoch * len(self) + index`` -> ``(image CHW float32, tokens int32 [77])``.

    Without a tokenizer the second item is the caption string. ``caption_dropout`` replaces the caption by ``""``
    with that probability (for classifier-free guidance). An image that fails to decode at load time is logged and
    replaced by the next record, so a batch never breaks.
    """

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
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.data_path = os.fspath(data_path)
        self.records, self.skipped = scan_dataset(data_path)
        self.tokenizer = tokenizer
        self.transform = ImageTransform(image_size, random_crop, flip, interpolation)
        self.caption_dropout = float(caption_dropout)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, sample_id: int, stream: int) -> np.random.Generator:
        epoch, index = divmod(int(sample_id), len(self.records))
        return np.random.default_rng([self.seed, epoch, index, stream])

    def caption(self, sample_id: int) -> str:
        """The caption of a sample: one of its captions, or ``""`` with probability ``caption_dropout``."""
        rng = self._rng(sample_id, 1)
        captions = self.records[int(sample_id) % len(self.records)].captions
        text = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        return "" if rng.random() < self.caption_dropout else text

    def _decode(self, index: int):
        """The PIL image of record ``index``, falling back to following records if it cannot be decoded."""
        n = len(self.records)
        for offset in range(n):
            path = self.records[(index + offset) % n].path
            try:
                return load_rgb(path)
            except Exception as err:  # PIL raises many types for bad files
                logger.error("cannot decode %s (%s: %s); using the next image", path, type(err).__name__, err)
        raise ValueError(f"{self.data_path}: no image could be decoded")

    def image(self, sample_id: int) -> np.ndarray:
        """The transformed image of a sample, falling back to following records if it cannot be decoded."""
        return self.transform(self._decode(int(sample_id) % len(self.records)), self._rng(sample_id, 0))

    def mirrored(self, sample_id: int) -> bool:
        """Whether :meth:`image` flips this sample (the same draw from the same generator; no random crop)."""
        if self.transform.random_crop:
            raise ValueError("the flip of a randomly cropped sample depends on its crop; cached inputs refuse it")
        return self.transform.draw_flip(self._rng(sample_id, 0))

    def record_image(self, index: int, mirrored: bool) -> np.ndarray:
        """Record ``index``'s image as :meth:`image` gives it for a sample drawing ``mirrored`` (no random crop)."""
        return self.transform.centred(self._decode(int(index)), mirrored)

    def __getitem__(self, sample_id):
        image = self.image(sample_id)
        text = self.caption(sample_id)
        if self.tokenizer is None:
            return image, text
        tokens = np.asarray(self.tokenizer([text]), dtype=np.int32)[0]
        return image, tokens


class ShardedSampler:
    """Sample ids ``epoch * N + index`` for this rank over a whole run of ``num_epochs`` epochs.

    Each epoch's order (shuffled per epoch, or sequential) is split over ranks as ``order[rank::world_size]``. With
    ``drop_last`` an epoch keeps the largest multiple of ``world_size * batch_size`` samples, otherwise it is padded
    by wrapping around to a multiple of ``world_size``; every rank gets the same count either way. The first
    ``batches_done * batch_size`` ids of the run are skipped (resume). The sampler is stateless: MindSpore calls
    ``iter()`` more than once while building a pipeline, and each call yields the same sequence.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        num_epochs: int = 1,
        batches_done: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or num_samples < 1 or num_epochs < 1:
            raise ValueError(
                f"need batch_size, num_samples and num_epochs >= 1, got {batch_size}, {num_samples}, {num_epochs}"
            )
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.num_epochs = rank, world_size, drop_last, num_epochs
        if drop_last:
            self.per_rank = num_samples // (world_size * batch_size) * batch_size
            if self.per_rank == 0:
                raise ValueError(
                    f"{num_samples} samples cannot fill one global batch of {world_size}x{batch_size} with drop_last"
                )
        else:
            self.per_rank = -(-num_samples // world_size)
        self.start = int(batches_done) * batch_size
        if not 0 <= self.start < self.per_rank * num_epochs:
            raise ValueError(
                f"batches_done={batches_done} is outside a run of {num_epochs} epochs of "
                f"{self.per_rank} samples per rank"
            )

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's record indices for ``epoch``."""
        n = self.num_samples
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, self.per_rank * self.world_size)  # trims (drop_last) or wraps around (padding)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.per_rank * self.num_epochs - self.start

    def __iter__(self) -> Iterator[int]:
        first, skip = divmod(self.start, self.per_rank)
        for epoch in range(first, self.num_epochs):
            ids = self.epoch_indices(epoch)[skip if epoch == first else 0 :] + epoch * self.num_samples
            yield from ids.tolist()


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
):
    """A batched ``mindspore.dataset.GeneratorDataset`` over a whole run of ``num_epochs`` epochs.

    Columns: ``image`` (B, 3, S, S) float32 in [-1, 1] and ``tokens`` (B, 77) int32. This rank gets its shard of
    every epoch (the sampler does the ``num_shards``/``shard_id`` split itself, since MindSpore's cannot be combined
    with a custom sampler). One pass over the returned dataset is the whole run; to resume, pass the number of
    batches this rank already consumed as ``batches_done``. ``num_workers`` is capped at the CPU count (MindSpore
    refuses more). With ``cache`` (see :mod:`ldm.data.cache`) the images and/or captions this rank will visit are
    encoded first, and the columns become ``moments`` (B, 2C, h, w) float32 and/or ``context`` (B, 77, D) float32.
    """
    import mindspore.dataset as msds

    source = ImageCaptionSource(
        data_path, tokenizer, image_size, random_crop, flip, caption_dropout, seed, interpolation
    )
    sampler = ShardedSampler(
        len(source), batch_size, shuffle, seed, rank, world_size, drop_last, num_epochs, batches_done
    )
    samples, columns = source, ["image", "tokens"]
    if cache is not None:
        samples = build_cache(source, iter(sampler), cache, progress=rank == 0)
        columns = list(samples.column_names)
    workers = max(1, min(int(num_workers), os.cpu_count() or 1))
    if workers != num_workers:
        logger.warning("num_workers=%d capped to %d (CPU count)", num_workers, workers)
    dataset = msds.GeneratorDataset(
        samples,
        column_names=columns,
        sampler=sampler,
        num_parallel_workers=workers,
        python_multiprocessing=python_multiprocessing,
    )
    logger.info(
        "%s: %d images; rank %d/%d gets %d per epoch, %d epochs, resuming after %d batches",
        source.data_path,
        len(source),
        rank,
        world_size,
        sampler.per_rank,
        num_epochs,
        batches_done,
    )
    return dataset.batch(batch_size, drop_remainder=drop_last)
