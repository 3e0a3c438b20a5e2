"""Image-caption data for fine-tuning: layout detection, transforms, a sharded resumable MindSpore pipeline."""

from ldm.data.cache import CachedSource, CacheEncoders, build_cache
from ldm.data.dataset import (
    ImageCaptionSource,
    Record,
    ShardedSampler,
    build_dataset,
    read_index,
    scan_dataset,
)
from ldm.data.transforms import ImageTransform

__all__ = [
    "CacheEncoders",
    "CachedSource",
    "build_cache",
    "ImageCaptionSource",
    "ImageTransform",
    "Record",
    "ShardedSampler",
    "build_dataset",
    "read_index",
    "scan_dataset",
]
