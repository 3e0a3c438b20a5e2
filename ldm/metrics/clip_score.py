"""CLIP score of image/prompt pairs.

Preprocessing is transformers' ``CLIPImageProcessor`` (as used by torchmetrics ``CLIPScore``): RGB, bicubic PIL
resize of the shortest side to ``image_size`` (long side ``int(size * long / short)``), center crop
(offset ``(dim - size) // 2``), scale to [0, 1], normalise with the CLIP mean/std. Prompts use the CLIP BPE
tokenizer, 77 tokens with ``<|endoftext|>`` kept last when a prompt is cut (OpenAI ``clip.tokenize(truncate=True)``).

Per pair ``s_i = 100 * cos(image_i, text_i)``. Clipping at 0, three conventions:

* ``per_sample`` (default): ``mean(max(s_i, 0))``, the original CLIPScore (Hessel et al. 2021) with w = 1 scaled
  to 100 (the paper uses w = 2.5 on the 0..1 scale).
* ``mean``: ``max(mean(s_i), 0)``, torchmetrics ``CLIPScore`` / ``clip_score`` (clamp after averaging).
* ``none``: ``mean(s_i)``, MindONE's MindSpore backend.

They agree unless some pair has a negative cosine, which is rare for real prompts.
"""

from __future__ import annotations

import numpy as np

CLIP_MODES = ("per_sample", "mean", "none")


def preprocess_image(image, size: int, mean, std) -> np.ndarray:
    """PIL image (any mode) -> CHW float32 normalised pixels, as ``CLIPImageProcessor``."""
    from PIL import Image

    from ldm.data.transforms import to_rgb8

    img = to_rgb8(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = np.asarray(img, np.float32)[top : top + size, left : left + size] / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def cosine_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """``100 * cos`` per row pair, in float64."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * (a * b).sum(-1)


def aggregate(scores: np.ndarray, mode: str = "per_sample") -> float:
    """Mean CLIP score with the clipping convention ``mode`` (see the module docstring)."""
    scores = np.asarray(scores, np.float64)
    if mode == "per_sample":
        return float(np.maximum(scores, 0).mean())
    if mode == "mean":
        return float(max(scores.mean(), 0.0))
    if mode == "none":
        return float(scores.mean())
    raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")


def embed_pairs(model, tokenizer, images, prompts, batch_size: int = 16, progress: bool = False):
    """Projected (image, text) embeddings [N, D] each for paired PIL images and prompt strings."""
    import mindspore as ms
    from tqdm import tqdm

    cfg = model.config
    img_out, txt_out = [], []
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, unit="batch"):
        chunk = images[start : start + batch_size]
        pixels = np.stack([preprocess_image(i, cfg.image_size, cfg.image_mean, cfg.image_std) for i in chunk])
        ids = tokenizer(list(prompts[start : start + batch_size]))
        img_out.append(model.image_embeds(ms.Tensor(pixels)).asnumpy())
        txt_out.append(model.text_embeds(ms.Tensor(ids)).asnumpy())
    return np.concatenate(img_out), np.concatenate(txt_out)
