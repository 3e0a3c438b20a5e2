"""``python -m ldm.lora select`` with the real models: the base model renders every candidate (each adapter merged
at each scale into the base weights kept once), the FID Inception network gives the features, a CLIP model the CLIP
score; :mod:`ldm.metrics.selection` scores and chooses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.metrics.selection import (
    mark_choice,
    plot_selection,
    rule_text,
    run_adapters,
    score_candidates,
    table,
    write_report,
)


@dataclass
class SelectJob:
    """What ``select`` was asked: the adapters, the base model and how to generate and score."""

    sources: list
    ckpt_path: str
    prompts: list
    prior_prompts: list
    output_dir: str
    scales: tuple = (1.0,)
    config: str | None = None
    real_stats: str | None = None
    real_dir: str | None = None
    inception_ckpt: str | None = None
    clip_model_dir: str | None = None
    n_samples: int = 2
    seed: int = 42
    sampler: str = "dpm_solver_pp"
    sampling_steps: int = 20
    guidance: float | None = None
    size: int | None = None
    rank_by: str = "fid"
    max_drift: float | None = None
    device_target: str = "CPU"
    mode: int = 0


class AdapterRenderer:
    """Images of prompts at fixed seeds (prompt k: seed + k, ``n_samples`` each) from the base model with one adapter
    merged at one scale; the base weights are kept once and restored for every candidate."""

    def __init__(self, model, settings, n_samples: int):
        from ldm.io.loading import cell_state_dict
        from ldm.pipeline import Text2ImagePipeline

        self.model, self.settings, self.n_samples = model, settings, n_samples
        self.base = cell_state_dict(model)
        self.pipe = Text2ImagePipeline(model, settings.sampler)
        self.current = (None, 0.0)

    def use(self, path: str | None, scale: float) -> None:
        from ldm.io.loading import load_state_dict_into
        from ldm.lora.adapter import read_adapter
        from ldm.lora.merge import merge_into_base

        if (path, scale) == self.current:
            return
        plain = path is None or scale == 0.0
        state = self.base if plain else merge_into_base(self.base, read_adapter(path), scale, source=path)
        load_state_dict_into(self.model, state, source=path or "base weights")
        self.current = (path, scale)

    def __call__(self, path, scale, prompts, seed) -> np.ndarray:
        self.use(path, scale)
        n, settings = self.n_samples, self.settings
        return np.concatenate([self.pipe([p] * n, settings=settings, seed=seed + k) for k, p in enumerate(prompts)])


def inception_features(ckpt: str | None, batch_size: int = 16):
    """uint8 images -> FID Inception pool3 features, in batches of a fixed shape."""
    from ldm.metrics.fid import batch_features
    from ldm.metrics.fid_weights import load_fid_inception

    net = load_fid_inception(ckpt)

    def features(images: np.ndarray) -> np.ndarray:
        pad = batch_size if len(images) > batch_size else len(images)
        parts = [batch_features(net, images[i : i + batch_size], pad) for i in range(0, len(images), batch_size)]
        return np.concatenate(parts)

    return features


def clip_scorer(model_dir: str):
    """(uint8 images, prompts) -> mean CLIP score (``per_sample`` convention) with the CLIP model in ``model_dir``."""
    from PIL import Image

    from ldm.io.checkpoint import read_state_dict
    from ldm.metrics.clip import CLIPModel, load_clip_state_dict, load_config
    from ldm.metrics.clip_score import aggregate, cosine_scores, embed_pairs
    from ldm.tokenizer import CLIPTokenizer

    weights = str(Path(model_dir) / "model.safetensors")
    model = CLIPModel(load_config(model_dir))
    load_clip_state_dict(model, read_state_dict(weights), weights)
    model.set_train(False)
    tokenizer = CLIPTokenizer()

    def score(images: np.ndarray, prompts) -> float:
        repeated = [p for p in prompts for _ in range(len(images) // len(prompts))]
        pairs = embed_pairs(model, tokenizer, [Image.fromarray(i) for i in images], repeated)
        return aggregate(cosine_scores(*pairs))

    return score


def reference_features(job: SelectJob, features) -> np.ndarray:
    """The real images' features: from ``real_stats`` (an .npz that keeps them) or computed from ``real_dir``."""
    from ldm.metrics.fid import FIDError, image_set, load_rgb, load_stats

    if job.real_stats:
        feats = load_stats(job.real_stats)[2]
        if feats is None:
            raise FIDError(f"{job.real_stats}: holds mu/sigma only; select needs the features (KID): pass --real_dir")
        return feats
    return features(np.stack([load_rgb(p) for p in image_set(job.real_dir, "real")]))


def run_select(job: SelectJob, log=print) -> dict:
    """Score every candidate, print the table, write ``selection.json`` and ``selection.png`` into ``output_dir``;
    returns the report's best candidate and the paths."""
    from ldm.env import init_env
    from ldm.generate import default_settings
    from ldm.io.model_config import resolve_model_config
    from ldm.io.model_io import load_pretrained
    from ldm.models.diffusion import build_model_from_config
    from ldm.pipeline import GenerationSettings

    adapters = run_adapters(job.sources)
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_env(job.device_target, job.mode)
    config = resolve_model_config(config=job.config, checkpoint=job.ckpt_path, fallback=job.config).config
    height, _, guidance = default_settings(config)
    model = build_model_from_config(config, uninitialised=True)
    load_pretrained(model, job.ckpt_path)
    size = job.size or height
    settings = GenerationSettings(
        sampler=job.sampler, steps=job.sampling_steps, scale=job.guidance or guidance, height=size, width=size
    )
    features = inception_features(job.inception_ckpt)
    reference = reference_features(job, features)
    candidates = score_candidates(
        adapters,
        job.scales,
        AdapterRenderer(model, settings, job.n_samples),
        features,
        job.prompts,
        job.prior_prompts,
        reference,
        seed=job.seed,
        clip_score=clip_scorer(job.clip_model_dir) if job.clip_model_dir else None,
        log=log,
    )
    best = mark_choice(candidates, job.rank_by, job.max_drift)
    log(table(candidates))
    log(f"rule: {rule_text(job.rank_by, job.max_drift)}")
    settings_used = {
        "base": job.ckpt_path,
        "scales": list(job.scales),
        "prompts": len(job.prompts),
        "prior_prompts": len(job.prior_prompts),
        "n_samples": job.n_samples,
        "seed": job.seed,
        "sampler": job.sampler,
        "sampling_steps": job.sampling_steps,
        "guidance": settings.scale,
        "size": size,
        "reference": job.real_stats or job.real_dir,
        "reference_images": len(reference),
    }
    write_report(out / "selection.json", candidates, job.rank_by, job.max_drift, settings_used)
    plot_selection(out / "selection.png", candidates, job.rank_by)
    ship = "the base model (no adapter)" if best.path is None else f"{best.path} at scale {best.scale:g}"
    log(f"ship: {ship}")
    return {"best": best, "json": str(out / "selection.json"), "plot": str(out / "selection.png")}
