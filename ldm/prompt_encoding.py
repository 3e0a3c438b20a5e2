"""Prompts -> text contexts: long prompts in 75-token chunks, ``(word:1.3)`` weights, ``clip_skip``.

Chunks
    A prompt's tokens are cut into pieces of ``max_length - 2`` (75 for SD); each piece is encoded on its own between
    a start and an end token, padded as the tokenizer pads (:meth:`ldm.tokenizer.CLIPTokenizer.chunks`), and the
    contexts are concatenated: ``[B, n * 77, width]``. This is the convention of the WebUI and of compel (its
    ``split_long_text_mode=BRUTAL``); the WebUI's extra rule of moving the words after a late comma to the next
    chunk is not applied. A batch's shorter prompts, and the shorter of a prompt and its negative prompt
    (:func:`pad_context`), are padded with chunks that encode the empty text, as both do. Cross-attention takes any
    context length, so the UNet needs no change.

Weights (``weighting=True``; off by default, where brackets are text as in training captions)
    Applied as the WebUI applies them: each chunk's context rows are multiplied by their tokens' weights (start, end
    and padding weigh 1), then the chunk is rescaled so that its mean is what it was before weighting. We chose the
    WebUI's rule over compel's (``empty + w * (z - empty)`` for w > 1, and for w < 1 a blend with the prompt
    re-encoded with those tokens masked out) because the ``(word:1.3)`` syntax is the WebUI's (compel spells it
    ``(word)1.3``): the weights users bring were tuned against this rule, and it costs no encoder pass beyond the
    prompt's own. The mean is taken per prompt and chunk (the WebUI takes it over the whole batch of one chunk,
    which only differs when different prompts share a batch).

A batch of prompts that each fit one chunk and carry no weights (or any prompts that fit, with weighting off) goes
through the text encoder exactly as before this module existed (the same ids in one call), so its contexts are bit
for bit the same.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

from ldm.models.text_encoders import check_clip_skip
from ldm.prompt_syntax import parse_prompt_weights
from ldm.tokenizer import CLIPTokenizer


def prompt_chunks(tokenizer: CLIPTokenizer, prompt: str, weighting: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, L], weights float32 [n, L]) of one prompt: with ``weighting`` each weighted fragment
    tokenized on its own (as the WebUI does), else the whole text at weight 1; the tokens chunked by the tokenizer;
    start, end and padding weigh 1."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_weights(prompt) if weighting else [(prompt, 1.0)]:
        tokens = tokenizer.encode(text)
        ids += tokens
        weights += [weight] * len(tokens)
    rows = tokenizer.chunks(ids)
    step = tokenizer.context_length - 2
    row_weights = np.ones(rows.shape, np.float32)
    for i in range(0, len(weights), step):
        piece = weights[i : i + step]
        row_weights[i // step, 1 : len(piece) + 1] = piece
    return rows, row_weights


def apply_weights(context: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One chunk's context ``[L, W]`` times its token weights ``[L]``, rescaled to the mean it had before."""
    context = context.astype(np.float32)
    original_mean = context.mean()
    weighted = context * weights[:, None]
    return weighted * (original_mean / weighted.mean())


def encode_prompts(embedder, prompts: list[str], clip_skip: int = 0, weighting: bool = False) -> Tensor:
    """Contexts ``[B, n * L, W]`` of ``prompts`` (n: chunks of the longest) from an SD text embedder; ``weighting``
    reads the WebUI's bracket syntax (:mod:`ldm.prompt_syntax`)."""
    check_clip_skip(clip_skip, embedder.layers)
    tokenizer = embedder.tokenizer
    chunked = [prompt_chunks(tokenizer, prompt, weighting) for prompt in prompts]
    n = max(rows.shape[0] for rows, _ in chunked)
    empty = tokenizer.chunks([])
    ids = np.concatenate([np.concatenate([rows, np.repeat(empty, n - len(rows), 0)]) for rows, _ in chunked])
    weights = np.concatenate([np.pad(w, ((0, n - len(w)), (0, 0)), constant_values=1.0) for _, w in chunked])
    context = embedder(Tensor(ids), clip_skip)
    if np.any(weights != 1.0):
        host = context.asnumpy()
        for row in np.flatnonzero(np.any(weights != 1.0, axis=1)):
            host[row] = apply_weights(host[row], weights[row]).astype(host.dtype)
        context = Tensor(host)
    return context.reshape(len(prompts), n * context.shape[1], context.shape[2])


def pad_context(context: Tensor, num_tokens: int, empty_chunk: Tensor) -> Tensor:
    """``context [B, m * L, W]`` extended to ``num_tokens`` with copies of ``empty_chunk [1, L, W]`` (the encoded
    empty text), so that a prompt and its negative prompt have contexts of one length."""
    missing = (num_tokens - context.shape[1]) // empty_chunk.shape[1]
    if missing <= 0:
        return context
    pad = ops.tile(empty_chunk.astype(context.dtype), (context.shape[0], missing, 1))
    return ops.cat((context, pad), axis=1)


def same_length(a: Tensor, b: Tensor, empty_chunk: Tensor | None) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` padded to the longer of the two (see :func:`pad_context`)."""
    if a.shape[1] == b.shape[1]:
        return a, b
    if empty_chunk is None:
        raise ValueError("contexts of different lengths need the encoded empty chunk to pad the shorter one")
    n = max(a.shape[1], b.shape[1])
    return pad_context(a, n, empty_chunk), pad_context(b, n, empty_chunk)


__all__ = ["apply_weights", "encode_prompts", "pad_context", "prompt_chunks", "same_length"]
