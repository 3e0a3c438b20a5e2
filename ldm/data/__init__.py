"""Image-caption data for fine-tuning: layout detection, transforms, a sharded resumable MindSpore pipeline."""

from ldm.data.buckets import BucketSpec
from ldm.data.cache import CachedSource, CacheEncoders, build_cache
from ldm.data.captions import CaptionRules
from ldm.data.dataset import ImageCaptionSource, TrainingData, build_dataset, build_pipeline
from ldm.data.kohya import FolderOptions, read_dataset_config
from ldm.data.records import Record, read_index
from ldm.data.sampler import BucketSampler, RunOrder, ShardedSampler
from ldm.data.transforms import ImageTransform

__all__ = [
    "BucketSampler",
    "BucketSpec",
    "CaptionRules",
    "FolderOptions",
    "read_dataset_config",
    "CacheEncoders",
    "CachedSource",
    "build_cache",
    "ImageCaptionSource",
    "ImageTransform",
    "Record",
    "RunOrder",
    "ShardedSampler",
    "TrainingData",
    "build_dataset",
    "build_pipeline",
    "read_index",
]
