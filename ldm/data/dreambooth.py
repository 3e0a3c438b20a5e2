"""DreamBooth data: the subject's images under one instance prompt, paired with class images under the class prompt.

diffusers' ``train_dreambooth_lora.py`` layout: ``instance_data_dir`` and ``class_data_dir`` are plain folders of
images (every image file in them; no index, no captions), captioned ``instance_prompt`` and ``class_prompt``. With
prior preservation every sample is a pair (instance, class) and an epoch has ``max(instances, class images)``
samples, so the smaller set repeats. Batched pairs come out as ``[B, 2, ...]``; :func:`instance_then_class` turns
them into the one batch of ``2B`` rows the loss splits in halves (instances first, as diffusers' ``collate_fn``).

Each half is an :class:`ImageCaptionSource` over its folder, addressed with the pair's own sample id: the flip of a
pair's class image is drawn from the class source's generator for that id, and caching (``ldm.data.cache``) works on
each half unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ldm.data.cache import CacheEncoders, build_cache
from ldm.data.dataset import ImageCaptionSource, generator_dataset, scan_dataset
from ldm.data.records import Record
from ldm.data.sampler import ShardedSampler
from ldm.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)


def is_image_file(name: str) -> bool:
    """Whether PIL reads files with this extension (what a DreamBooth folder's images are told apart by)."""
    return os.path.splitext(name)[1].lower() in Image.registered_extensions()


def image_files(folder) -> list[str]:
    """The image files directly in ``folder``, sorted by name (hidden and temporary files excluded)."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and is_image_file(n))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def scan_image_folder(folder, option: str, prompt: str = "") -> list[Record]:
    """Records of the readable images in ``folder``, each captioned ``prompt``; unreadable ones are skipped with a
    warning; none at all is a ValueError naming ``option`` and the folder."""
    folder = os.fspath(folder)
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"{option} {folder}: no image files")
    return scan_dataset(folder, option, [Record(p, (prompt,)) for p in paths])[0]


def check_instance_prompt(instance_prompt: str, class_prompt: str = "", tokenizer: CLIPTokenizer | None = None):
    """The instance prompt keeps a token of its own through the tokenizer: it is not cut at the context length and
    has a token the class prompt lacks (the subject's identifier). A ValueError says which rule failed."""
    tokenizer = tokenizer or CLIPTokenizer()
    ids = tokenizer.encode(instance_prompt)
    room = tokenizer.context_length - 2
    if not ids:
        raise ValueError(f"instance_prompt {instance_prompt!r} has no token the tokenizer keeps")
    if len(ids) > room:
        raise ValueError(
            f"instance_prompt is {len(ids)} tokens; the tokenizer keeps {room} and cuts the rest "
            f"({len(ids) - room} tokens): shorten it so the subject's token is kept"
        )
    if class_prompt and not set(ids) - set(tokenizer.encode(class_prompt)):
        raise ValueError(
            f"instance_prompt {instance_prompt!r} has no token that class_prompt {class_prompt!r} lacks: add the "
            "subject's identifier (e.g. 'a sks dog' for the class 'a dog')"
        )


class DreamBoothSource:
    """Sample id -> the instance sample (image or cached moments, tokens or cached context), or with a class source
    the instance and class samples stacked: ``([2, ...], [2, ...])``."""

    def __init__(self, instances, classes=None):
        self.instances, self.classes = instances, classes
        self.column_names = tuple(getattr(instances, "column_names", ("image", "tokens")))

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes)) if self.classes is not None else len(self.instances)

    def __getitem__(self, sample_id):
        first, second = self.instances[sample_id]
        if self.classes is None:
            return first, second
        class_first, class_second = self.classes[sample_id]
        return np.stack([first, class_first]), np.stack([second, class_second])


def instance_then_class(batch: np.ndarray) -> np.ndarray:
    """``[B, 2, ...]`` pairs -> ``[2B, ...]``: the B instance rows, then the B class rows."""
    return batch.swapaxes(0, 1).reshape(-1, *batch.shape[2:])


def build_dreambooth_dataset(
    instance_records: list[Record],
    class_records: list[Record] | None,
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    image_size: int = 512,
    batch_size: int = 1,
    seed: int = 0,
    random_crop: bool = False,
    flip: bool = False,
    caption_dropout: float = 0.0,
    num_workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_epochs: int = 1,
    batches_done: int = 0,
    cache: CacheEncoders | None = None,
):
    """The DreamBooth pipeline over a whole run, sharded and resumable like ``build_dataset`` (same arguments after
    the records); each half is cached on its own when ``cache`` is given. Columns as ``build_dataset``'s, with a
    pair axis after the batch axis when there are class records."""
    root = os.path.dirname(instance_records[0].path)
    halves = [
        ImageCaptionSource(
            os.path.dirname(records[0].path),
            tokenizer,
            image_size,
            random_crop,
            flip,
            caption_dropout,
            seed,
            records=records,
        )
        for records in (instance_records, class_records)
        if records is not None
    ]
    size = max(len(h) for h in halves)
    if size < batch_size * world_size:
        raise ValueError(
            f"instance_data_dir {root}: {size} DreamBooth samples cannot fill one global batch of "
            f"{world_size}x{batch_size}; lower train_batch_size or add images"
        )
    sampler = ShardedSampler(size, batch_size, True, seed, rank, world_size, True, num_epochs, batches_done)
    if cache is not None:
        halves = [build_cache(h, iter(sampler), cache, progress=rank == 0) for h in halves]
    samples = DreamBoothSource(*halves)
    logger.info(
        "DreamBooth: %d instance images%s; %d pairs per epoch",
        len(instance_records),
        f", {len(class_records)} class images" if class_records is not None else "",
        size,
    )
    dataset = generator_dataset(samples, list(samples.column_names), sampler, num_workers)
    batched = dataset.batch(batch_size, drop_remainder=True)
    batched.bucket_order = batched.bucket_table = None  # one resolution: DreamBooth pairs take no buckets
    return batched
