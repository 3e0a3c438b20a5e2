"""DreamBooth on the tiny SD: what each adapter does to its subject and to the class prior (model card figures).

    python tools/tiny_sd/dreambooth_drift.py --adapter with_prior=OUT1/ckpt/lora-000200.safetensors \
        --adapter without_prior=OUT2/ckpt/lora-000200.safetensors --instance_dir DIR --out output/dreambooth_drift

The base model and each adapter draw the class prompt and the instance prompt from the same seeds (the same start
noise). Prior drift is the measure of ``python -m ldm.lora select`` (``ldm.metrics.selection.prior_drift``): the
mean distance between the FID Inception features of the base model's and the adapter's class-prompt images, pair by
pair. Subject similarity: the mean cosine between the tiny SD's own CLIP (``models/tiny_sd/clip``) embeddings of the
instance-prompt images and the mean embedding of the instance images. One model and one compiled pipeline serve
every variant: each adapter is merged into the base weights restored before it. Writes ``drift.json`` and
``grid.png`` (per model a row of class-prompt images, then a row of instance-prompt images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.atomic import save_image, write_json

ROOT = Path(__file__).resolve().parents[2]


def clip_embeddings(model, images: np.ndarray) -> np.ndarray:
    """Unit-length CLIP image embeddings [N, D] of uint8 images (the CLIP score's preprocessing)."""
    import mindspore as ms
    from PIL import Image

    from ldm.metrics.clip_score import preprocess_image

    cfg = model.config
    pixels = np.stack(
        [preprocess_image(Image.fromarray(i), cfg.image_size, cfg.image_mean, cfg.image_std) for i in images]
    )
    emb = model.image_embeds(ms.Tensor(pixels)).asnumpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models/tiny_sd/tiny_sd.safetensors"))
    p.add_argument("--clip", default=str(ROOT / "models/tiny_sd/clip"))
    p.add_argument("--adapter", action="append", default=[], help="LABEL=PATH of a DreamBooth adapter (repeat)")
    p.add_argument("--instance_dir", required=True, help="the instance images the adapters learned")
    p.add_argument("--instance_prompt", default="a clip art drawing of sks jigsaw (jigsaw, shapes)")
    p.add_argument("--class_prompt", default="a clip art drawing of jigsaw (jigsaw, shapes)")
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--inception_ckpt", default=None, help="FID Inception weights (default: located as eval_fid does)")
    p.add_argument("--out", default="output/dreambooth_drift")
    args = p.parse_args(argv)
    from PIL import Image

    from ldm.data.dreambooth import image_files
    from ldm.env import init_env
    from ldm.io.checkpoint import read_state_dict
    from ldm.io.loading import cell_state_dict, load_state_dict_into
    from ldm.io.model_config import resolve_model_config
    from ldm.io.model_io import load_pretrained
    from ldm.lora.merge import apply_adapters
    from ldm.metrics.clip import CLIPModel, load_clip_state_dict, load_config
    from ldm.metrics.select_run import inception_features
    from ldm.metrics.selection import prior_drift
    from ldm.models.diffusion import build_model_from_config
    from ldm.pipeline import GenerationSettings, Text2ImagePipeline, make_grid

    init_env("CPU", 0)
    clip = CLIPModel(load_config(args.clip))
    weights = str(Path(args.clip) / "model.safetensors")
    load_clip_state_dict(clip, read_state_dict(weights), weights)
    clip.set_train(False)
    files = image_files(args.instance_dir)
    instances = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in files])
    subject = clip_embeddings(clip, instances).mean(axis=0)
    subject /= np.linalg.norm(subject)
    features = inception_features(args.inception_ckpt)

    model = build_model_from_config(resolve_model_config(checkpoint=args.model).config, uninitialised=True)
    load_pretrained(model, args.model)
    base_state = cell_state_dict(model)
    pipe = Text2ImagePipeline(model, sampler="dpm_solver_pp")
    settings = GenerationSettings(steps=args.steps, scale=args.scale, height=64, width=64)
    latents = np.concatenate([pipe.initial_latents(1, 64, 64, seed) for seed in range(args.seeds)])
    results, rows, base_features = {}, [], None
    for label, adapter in [("base", "")] + [tuple(a.split("=", 1)) for a in args.adapter]:
        load_state_dict_into(model, base_state, source=args.model)
        if adapter:
            apply_adapters(model, [(adapter, 1.0)], log=lambda _: None)
        class_images = pipe([args.class_prompt] * args.seeds, settings=settings, latents=latents)
        instance_images = pipe([args.instance_prompt] * args.seeds, settings=settings, latents=latents)
        class_features = features(class_images)
        base_features = class_features if base_features is None else base_features
        results[label] = {
            "adapter": Path(adapter).name if adapter else None,
            "prior_drift": prior_drift(base_features, class_features),
            "subject_similarity": float((clip_embeddings(clip, instance_images) @ subject).mean()),
        }
        print(label, json.dumps(results[label]), flush=True)
        rows += [class_images[:8], instance_images[:8]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"class_prompt": args.class_prompt, "instance_prompt": args.instance_prompt, "seeds": args.seeds}
    write_json(out / "drift.json", {**summary, "models": results}, indent=1)
    save_image(out / "grid.png", make_grid(np.concatenate(rows), rows=len(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
