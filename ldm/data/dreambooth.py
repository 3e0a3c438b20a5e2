"""DreamBooth data: the subject's images under one instance prompt, paired with class images under the class prompt.

diffusers' ``train_dreambooth_lora.py`` layout: ``instance_data_dir`` and ``class_data_dir`` are plain folders of
images (every image file in them; no index, no captions), captioned ``instance_prompt`` and ``class_prompt``. A kohya
dataset config gives the same two halves as subsets: ``is_reg = true`` ones are the class images, the others the
instances, each image captioned by its sidecar or its subset's ``class_tokens``. With prior preservation every
sample is a pair (instance, class) and an epoch has ``max(instances, class images)`` samples, so the smaller set
repeats. Batched pairs come out as ``[B, 2, ...]``; :func:`instance_then_class` turns them into the one batch of
``2B`` rows the loss splits in halves (instances first, as diffusers' ``collate_fn``), so the loss is diffusers'
``instance_loss + prior_loss_weight * prior_loss`` whatever the buckets.

Aspect-ratio buckets: the batches are cut by the instance images' buckets (:class:`ldm.data.sampler.BucketSampler`,
so every rank trains the same bucket at each step) and each pair's class image is resized to cover its instance's
bucket and cropped (kohya instead buckets regularization images by their own aspect ratio and weights them per
example; pairing keeps both halves of every batch the same size, which diffusers' split needs).

Each half is an :class:`ImageCaptionSource` over its records repeated to the epoch's length, addressed with the
pair's sample id (the class half's generators have a key of their own, so its flips and caption dropout do not
follow the instance's); caching (``ldm.data.cache``) works on each half unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ldm.data.buckets import BucketSpec
from ldm.data.captions import CaptionRules
from ldm.data.dataset import ImageCaptionSource, TrainingData, scan_dataset
from ldm.data.records import Record
from ldm.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)
CLASS_DRAWS = (1,)  # extends the class half's sample keys: its flips and caption dropout are drawn independently


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
    the instance and class samples of the pair stacked: ``([2, ...], [2, ...])``."""

    def __init__(self, instances, classes=None):
        self.instances, self.classes = instances, classes
        self.column_names = tuple(instances.column_names)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, sample_id):
        first, second = self.instances[sample_id]
        if self.classes is None:
            return first, second
        class_first, class_second = self.classes[sample_id]
        return np.stack([first, class_first]), np.stack([second, class_second])


def instance_then_class(batch: np.ndarray) -> np.ndarray:
    """``[B, 2, ...]`` pairs -> ``[2B, ...]``: the B instance rows, then the B class rows."""
    return batch.swapaxes(0, 1).reshape(-1, *batch.shape[2:])


def dreambooth_data(
    instance_records: list[Record],
    class_records: list[Record] | None,
    tokenizer: Callable[[Sequence[str]], np.ndarray] | None,
    image_size: int = 512,
    seed: int = 0,
    random_crop: bool = False,
    flip: bool = False,
    caption_dropout: float = 0.0,
    *,
    buckets: BucketSpec | None = None,
    subset_rules: list[CaptionRules] | None = None,
    label: str = "",
) -> TrainingData:
    """DreamBooth's samples: pair ``k`` of every epoch is instance ``k % I`` and class image ``k % C`` (``I``, ``C``
    checked records; an epoch has ``max(I, C)`` pairs), each half an :class:`ImageCaptionSource` over its records
    repeated to that length. With ``buckets`` an instance image goes to its bucket of nearest aspect ratio and its
    pair's class image is resized to cover that same bucket and cropped, so a batch of one bucket holds B instance
    and B class images of that resolution. ``subset_rules`` are the caption rules of a dataset config's subsets
    (``Record.subset``); without them every caption follows ``caption_dropout`` alone."""
    size = max(len(instance_records), len(class_records or ()))
    label = label or os.path.dirname(instance_records[0].path)
    common = {"random_crop": random_crop, "flip": flip, "caption_dropout": caption_dropout, "seed": seed}
    common.update(buckets=buckets, subset_rules=subset_rules)

    def half(records: list[Record], **kwargs) -> ImageCaptionSource:
        repeated = [records[k % len(records)] for k in range(size)]
        return ImageCaptionSource(label, tokenizer, image_size, **common, records=repeated, **kwargs)

    halves = [half(instance_records)]
    if class_records is not None:
        placements = halves[0].placements
        bucket_of = None if placements is None else [p.bucket for p in placements]
        halves.append(half(class_records, bucket_of=bucket_of, draw_key=CLASS_DRAWS))
    logger.info(
        "DreamBooth: %d instance images%s; %d pairs per epoch",
        len(instance_records),
        f", {len(class_records)} class images" if class_records is not None else "",
        size,
    )
    return TrainingData(halves, DreamBoothSource, label)
