"""DreamBooth class images: top ``class_data_dir`` up to ``num_class_images`` with images of ``class_prompt`` drawn
by the base model, as diffusers' ``train_dreambooth_lora.py`` does, but reproducible and safe to interrupt.

Image ``i`` is ``class-<i:05d>.png``, sampled from its own start noise (``default_rng([seed, i])``), so an image does
not depend on which others shared its batch. ``class_images.json`` (the manifest) records what they were generated
from: prompt, seed, the base model's hash (:func:`weights_hash`) and the sampler settings. It is written before the
first image; each image is written atomically (``ldm.atomic``), so a killed run leaves whole images only and the
next run removes the temporary files and generates the images missing. Generated images are reused while the
manifest matches; when the prompt, seed, settings or base model changed they are deleted and drawn again. Other
image files in the folder are the user's own class images: they count toward ``num_class_images`` and are never
touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ldm.atomic import save_image, write_json
from ldm.data.dreambooth import image_files

LOGGER = logging.getLogger("ldm.train")
MANIFEST = "class_images.json"
_GENERATED = re.compile(r"class-(\d{5})\.png")


@dataclass(frozen=True)
class ClassImageSpec:
    """What generated class images are drawn from; two runs reuse each other's images only when these are equal."""

    prompt: str
    seed: int
    base_model: str
    size: int
    sampler: str = "dpm_solver_pp"
    steps: int = 25
    scale: float = 7.5


def weights_hash(model) -> str:
    """SHA-256 over the base model's weights (name, dtype, shape, bytes; LoRA branches excluded, in name order):
    the same weights give the same hash whatever file format they came from."""
    digest = hashlib.sha256()
    for p in sorted(model.get_parameters(), key=lambda p: p.name):
        if ".lora_" in p.name:
            continue
        value = p.asnumpy()
        digest.update(f"{p.name}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def generated_name(index: int) -> str:
    return f"class-{index:05d}.png"


def read_manifest(folder: Path) -> dict | None:
    """The manifest's content, or None when absent or unreadable (then no image in the folder counts as ours)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class ClassImagePlan:
    """The state of a class folder against a spec: the user's images, the generated ones to keep, the stale ones
    to delete and the indices still to draw."""

    user: list[str]
    kept: list[str]
    stale: list[str]
    missing: list[int]

    def paths(self, num_class_images: int) -> list[str]:
        """The class images a run trains on: the user's first, then the generated ones, ``num_class_images``."""
        return (self.user + self.kept)[:num_class_images]


def plan_class_images(folder, spec: ClassImageSpec, num_class_images: int) -> ClassImagePlan:
    """What :func:`ensure_class_images` would do to ``folder`` (nothing is changed here)."""
    folder = Path(folder)
    files = image_files(folder) if folder.is_dir() else []
    manifest = read_manifest(folder)
    ours = {p: int(m.group(1)) for p in files if manifest is not None and (m := _GENERATED.fullmatch(Path(p).name))}
    user = [p for p in files if p not in ours]
    needed = max(0, num_class_images - len(user))
    matches = manifest is not None and manifest.get("spec") == asdict(spec)
    kept = sorted(p for p, i in ours.items() if matches and i < needed)
    stale = sorted(p for p in ours if not matches)
    have = {ours[p] for p in kept}
    return ClassImagePlan(user, kept, stale, [i for i in range(needed) if i not in have])


def ensure_class_images(folder, spec: ClassImageSpec, num_class_images: int, generate, sample_batch_size: int = 4):
    """Bring ``folder`` to ``num_class_images`` class images and return their paths (user's first).

    ``generate(prompts, indices) -> uint8 [B, H, W, 3]`` draws the images of these indices (each from its own start
    noise, :func:`start_noise`; :func:`pipeline_generator` with the base model). Progress is shown with a bar;
    leftovers of a killed run are cleaned up."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in [*folder.glob(".class-*.tmp*"), *folder.glob(f".{MANIFEST}.*.tmp*")]:
        leftover.unlink()
    plan = plan_class_images(folder, spec, num_class_images)
    if plan.stale:
        LOGGER.info(
            "%s: %d generated class images were drawn from another prompt, seed, sampler or base model; drawing "
            "them again",
            folder,
            len(plan.stale),
        )
        for path in plan.stale:
            os.remove(path)
    if not plan.missing:
        LOGGER.info("%s: %d class images (%d generated, reused)", folder, num_class_images, len(plan.kept))
        return plan.paths(num_class_images)
    write_json(folder / MANIFEST, {"spec": asdict(spec)})
    with tqdm(total=len(plan.missing), desc="class images", unit="image") as bar:
        for start in range(0, len(plan.missing), sample_batch_size):
            indices = plan.missing[start : start + sample_batch_size]
            images = generate([spec.prompt] * len(indices), indices)
            for index, image in zip(indices, images):
                save_image(folder / generated_name(index), image)
                bar.update(1)
    return plan_class_images(folder, spec, num_class_images).paths(num_class_images)


def wait_for_class_images(folder, spec: ClassImageSpec, num_class_images: int, poll_s: float = 5.0) -> list[str]:
    """Another rank's view under data parallelism: wait until rank 0 has written every class image; their paths."""
    import time

    LOGGER.info("%s: waiting for rank 0 to write the class images", folder)
    while True:
        plan = plan_class_images(folder, spec, num_class_images)
        if not plan.missing and not plan.stale:
            return plan.paths(num_class_images)
        time.sleep(poll_s)


def start_noise(spec: ClassImageSpec, index: int, channels: int, factor: int) -> np.ndarray:
    """Image ``index``'s start latents ``[1, C, size / factor, size / factor]``, from ``default_rng([seed, index])``."""
    side = spec.size // factor
    return np.random.default_rng([spec.seed, index]).standard_normal((1, channels, side, side), dtype=np.float32)


def pipeline_generator(model, spec: ClassImageSpec):
    """``generate(prompts, indices)`` for :func:`ensure_class_images` through our ``Text2ImagePipeline``."""
    from ldm.pipeline import GenerationSettings, Text2ImagePipeline

    pipe = Text2ImagePipeline(model, sampler=spec.sampler)
    settings = GenerationSettings(
        sampler=spec.sampler, steps=spec.steps, scale=spec.scale, height=spec.size, width=spec.size
    )

    def generate(prompts, indices):
        latents = np.concatenate([start_noise(spec, i, model.channels, model.latent_factor) for i in indices])
        return pipe(prompts, settings=settings, seed=spec.seed, latents=latents)

    return generate
