"""The evaluation runs behind ``tools/eval/eval_fid.py`` and ``eval_clip_score.py``: check the inputs, start
MindSpore, load the network, score, and write the result JSON. The CLIs only parse arguments and print.

Inputs are checked before MindSpore starts (missing images, weights, prompt files fail at once, naming the culprit).
"""

from __future__ import annotations

import os
import sys

NETWORK = "inception-2015-12-05 pool3 (2048-d)"
RESIZE = "tf1_bilinear_299"
CLIP_HF_EXAMPLE = "openai/clip-vit-base-patch16"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class InputError(ValueError):
    """Bad evaluation input (images, prompts, weights); the message names the culprit."""


def evaluate_fid(
    gen_dir: str,
    real_dir: str | None = None,
    real_stats: str | None = None,
    inception_ckpt: str | None = None,
    batch_size: int = 16,
    fid_method: str = "sqrtm",
    kid: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device_target: str = "CPU",
    mode: int = 0,
    progress: bool = True,
    compile_cache: bool = False,
) -> dict:
    """FID (and KID with ``kid``) of the images in ``gen_dir`` against ``real_dir`` or the statistics in
    ``real_stats`` (read if the file exists, else written from ``real_dir``). ``compile_cache``: reuse the
    Inception graphs of an earlier run with the same batch shapes (``ldm.compile_cache``; the CLI's default)."""
    from ldm.compile_cache import use_compile_cache
    from ldm.env import init_env
    from ldm.metrics.fid import (
        FIDError,
        extract_features,
        feature_stats,
        frechet_distance,
        image_set,
        kernel_inception_distance,
        load_stats,
        save_stats,
    )
    from ldm.metrics.fid_weights import load_fid_inception, resolve

    cached = bool(real_stats) and os.path.isfile(real_stats)
    if not cached and not real_dir:
        raise InputError("--real_dir is required unless --real_stats names an existing file")
    real_paths = None if cached else image_set(real_dir, "real")
    gen_paths = image_set(gen_dir, "generated")
    resolve(inception_ckpt)  # fail on missing weights before MindSpore starts
    init_env(device_target, mode=mode)
    # The graphs: one per batch shape, real set first (each set runs as batches of min(batch_size, its size)).
    shapes = {"real": None if cached else min(batch_size, len(real_paths)), "gen": min(batch_size, len(gen_paths))}
    use_compile_cache(compile_cache, mode, "fid", {"device_target": device_target}, shapes, log=_stderr)
    net = load_fid_inception(inception_ckpt)
    if cached:
        mu_r, sigma_r, real_feats = load_stats(real_stats)
        if kid and real_feats is None:
            raise FIDError(f"{real_stats}: has no features, so KID cannot be computed; pass --real_dir instead")
    else:
        real_feats = extract_features(net, real_paths, batch_size, progress, desc="real")
        mu_r, sigma_r = feature_stats(real_feats)
        if real_stats:
            save_stats(real_stats, real_feats)
    gen_feats = extract_features(net, gen_paths, batch_size, progress, desc="generated")
    result = {
        "fid": frechet_distance(mu_r, sigma_r, *feature_stats(gen_feats), method=fid_method),
        "fid_method": fid_method,
        "num_real": int(real_feats.shape[0]) if real_feats is not None else None,
        "num_gen": len(gen_paths),
        "real": real_stats if cached else real_dir,
        "gen": gen_dir,
        "network": NETWORK,
        "resize": RESIZE,
    }
    if kid:
        kid_mean, kid_std = kernel_inception_distance(
            real_feats, gen_feats, subsets=kid_subsets, subset_size=kid_subset_size
        )
        subset = min(kid_subset_size, len(real_feats), len(gen_feats))
        result.update(kid_mean=kid_mean, kid_std=kid_std, kid_subsets=kid_subsets, kid_subset_size=subset)
    return result


def read_prompt_lines(path: str) -> list[str]:
    """Line i is the prompt of image i; trailing blank lines are dropped, a blank line before them is an error."""
    from ldm.util import read_text_utf8

    try:
        lines = read_text_utf8(path).splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read prompts ({exc.strerror})") from exc
    except ValueError as exc:
        raise InputError(str(exc)) from None
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        raise InputError(f"{path}:{blank[0]}: blank prompt line (line i is the prompt of image i)")
    return lines


def clip_weights_path(ckpt: str | None, model_dir: str | None) -> str:
    """The CLIP weights file: ``ckpt``, else ``<model_dir>/model.safetensors``; an error saying how to get one."""
    path = ckpt or (os.path.join(model_dir, "model.safetensors") if model_dir else None)
    if path is None or not os.path.isfile(path):
        raise InputError(
            f"CLIP weights not found ({path or 'no --model_dir or --ckpt given'}). Download a Hugging Face CLIP "
            f"model, e.g. `huggingface-cli download {CLIP_HF_EXAMPLE} config.json model.safetensors --local-dir "
            "clip-b16`, and pass --model_dir clip-b16"
        )
    return path


def evaluate_clip_score(
    image_dir: str,
    prompts: str,
    model_dir: str | None = None,
    model: str = "vit-b-16",
    ckpt: str | None = None,
    clip_mode: str = "per_sample",
    batch_size: int = 16,
    device_target: str = "CPU",
    mode: int = 0,
    progress: bool = True,
    compile_cache: bool = False,
) -> dict:
    """CLIP score of the images in ``image_dir`` (sorted by file name, or one image file) against ``prompts``: a
    file whose line i is the prompt of image i, or the prompt of every image. ``compile_cache``: reuse the graphs of
    an earlier run with the same model config and batch sizes (``ldm.compile_cache``; the CLI's default)."""
    from ldm.compile_cache import use_compile_cache
    from ldm.env import init_env
    from ldm.metrics.clip import load_config
    from ldm.metrics.fid import check_images, list_images

    paths = [image_dir] if os.path.isfile(image_dir) else list_images(image_dir)
    if not paths:
        raise InputError(f"image folder {image_dir} has no images")
    texts = read_prompt_lines(prompts) if os.path.isfile(prompts) else [prompts] * len(paths)
    if len(texts) != len(paths):
        raise InputError(
            f"{prompts} has {len(texts)} prompts but {image_dir} has {len(paths)} images; "
            "line i must be the prompt of image i in sorted file-name order"
        )
    check_images(paths)
    weights = clip_weights_path(ckpt, model_dir)
    cfg = load_config(model_dir or model)
    init_env(device_target, mode=mode)
    # The graphs: the image and text towers at each batch size met (full batches, then the last, shorter one).
    shapes = {"config": repr(cfg), "images": len(paths), "batch_size": batch_size}
    use_compile_cache(compile_cache, mode, "clip", {"device_target": device_target}, shapes, log=_stderr)
    from PIL import Image

    from ldm.io.checkpoint import read_state_dict
    from ldm.metrics.clip import CLIPModel, load_clip_state_dict
    from ldm.metrics.clip_score import aggregate, cosine_scores, embed_pairs
    from ldm.tokenizer import CLIPTokenizer

    net = CLIPModel(cfg)
    load_clip_state_dict(net, read_state_dict(weights), weights)
    net.set_train(False)
    images = [Image.open(p) for p in paths]
    img_emb, txt_emb = embed_pairs(net, CLIPTokenizer(), images, texts, batch_size, progress)
    scores = cosine_scores(img_emb, txt_emb)
    return {
        "clip_score": aggregate(scores, clip_mode),
        "clip_mode": clip_mode,
        "model": model_dir or model,
        "weights": weights,
        "num_pairs": len(paths),
        "per_image": [
            {"image": os.path.basename(p), "prompt": t, "score": float(s)} for p, t, s in zip(paths, texts, scores)
        ],
    }
