"""The MindSpore side of the training cache (:mod:`ldm.data.cache`): the frozen encoders a cache is built with, run
op by op so they can be freed, and their release once their outputs are cached.

``opts`` below is the run's ``TrainOptions`` (read: ``cache_latents``, ``cache_text_embeddings``).
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager

import mindspore as ms
from mindspore import nn, ops

from ldm.data.cache import CacheEncoders

LOGGER = logging.getLogger("ldm.train")


class PosteriorMoments(nn.Cell):
    """Images -> the VAE posterior's (mean, log-variance) concatenated on channels: what ``cache_latents`` keeps."""

    def __init__(self, ldm):
        super().__init__(auto_prefix=False)
        self.ldm = ldm

    def construct(self, images):
        return ops.cat(self.ldm.encode_first_stage(images), axis=1)


class TextContext(nn.Cell):
    """Token ids -> text context, as its own graph so that releasing the text encoder frees its compiled form too."""

    def __init__(self, ldm):
        super().__init__(auto_prefix=False)
        self.ldm = ldm

    def construct(self, ids):
        return self.ldm.get_learned_conditioning(ids)


class ReleasedNetwork(nn.Cell):
    """Takes the place of a frozen network dropped once its outputs are cached; calling it is an error."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def construct(self, *args):
        raise RuntimeError(f"{self.name} was released after its outputs were cached")


@contextmanager
def op_by_op():
    """Run the frozen encoders eagerly while caching: MindSpore 2.10 keeps the weights of a compiled graph alive
    after its cell is gone, so encoders compiled in graph mode could not be released (measured: RSS unchanged, and
    288 of 482 MiB returned to the system when the same text encoder ran op by op)."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


def cache_encoders(model, opts):
    """The frozen encoders ``build_pipeline`` caches with (``cache_latents`` / ``cache_text_embeddings``), or None."""
    if not (opts.cache_latents or opts.cache_text_embeddings):
        return None
    moments, context = PosteriorMoments(model), TextContext(model)

    def encode_images(batch):
        with op_by_op():
            return moments(ms.Tensor(batch)).asnumpy()

    def encode_texts(captions):
        with op_by_op():
            return context(ms.Tensor(model.tokenize(captions))).asnumpy()

    return CacheEncoders(
        images=encode_images if opts.cache_latents else None,
        texts=encode_texts if opts.cache_text_embeddings else None,
    )


def encode_validation_prompts(model, prompts: list[str]) -> dict:
    """The contexts the validation pipeline asks for (prompts, and as many empty negatives), computed now."""
    encode = TextContext(model)
    with op_by_op():
        return {
            tuple(texts): ms.Tensor(encode(ms.Tensor(model.tokenize(texts))).asnumpy())
            for texts in (list(prompts), [""] * len(prompts))
        }


def release_cached_networks(model, opts, validating: bool) -> None:
    """Drop the frozen networks whose outputs are now cached: the VAE encoder (and the decoder unless validation
    grids need it) with ``cache_latents``, the text encoder with ``cache_text_embeddings``."""
    vae_parts = ["encoder", "quant_conv"] + ([] if validating else ["decoder", "post_quant_conv"])
    released = [f"first_stage_model.{name}" for name in vae_parts] if opts.cache_latents else []
    if opts.cache_text_embeddings:
        released += [f"cond_stage_model.{name}" for name in model.cond_stage_model.name_cells()]
    freed = 0
    for path in released:
        parent, name = path.split(".")
        freed += sum(p.nbytes for p in getattr(getattr(model, parent), name).get_parameters())
        setattr(getattr(model, parent), name, ReleasedNetwork(path))
    gc.collect()
    LOGGER.info("released %s after caching: %.1f MiB of weights", ", ".join(released), freed / 2**20)
