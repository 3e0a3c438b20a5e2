"""Text-to-image generation as a library call: build the model, load weights, merge LoRA adapters, sample, save.

:func:`generate` is what ``examples/stable_diffusion_v2/text_to_image.py`` runs. Outputs go to
``<output_path>/samples/NNNNN.png`` with a ``NNNNN.json`` sidecar each (numbering continues after existing files,
nothing is overwritten) and one ``<output_path>/grid-<k>.png`` per prompt. Iteration ``i`` of every prompt starts
from the latents of seed ``seed + i``, so a run is reproducible image by image.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ldm.atomic import save_image, write_json
from ldm.generate_options import GenerateOptions, GenerationError
from ldm.io.model_config import ResolvedConfig, find_config_file, resolve_model_config
from ldm.memory_plan import (
    GENERATION_SWITCHES,
    GenerateJob,
    apply_plan,
    available_memory,
    given_switches,
    plan_generation,
)
from ldm.names import DEFAULT_GUIDANCE, IMG2IMG_SAMPLER_NAMES, SAMPLER_NAMES, family_of_config, model_node
from ldm.precision import resolve_policy
from ldm.prompt_syntax import parse_prompt_weights
from ldm.schedule import img2img_start_step

DEFAULT_VERSION = "2.1"
DEFAULT_STRENGTH = 0.8  # diffusers' StableDiffusionImg2ImgPipeline default
_NUMBERED = re.compile(r"(\d{5})\.(?:png|json)")
_GRID = re.compile(r"grid-(\d+)\.png")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def batch_seed(job: GenerateOptions, prompt_index: int, iteration: int) -> int:
    """Seed of one batch: ``seed + iteration``, offset by ``prompt_index * n_iter`` with ``seed_per_prompt``."""
    return job.seed + (prompt_index * job.n_iter if job.seed_per_prompt else 0) + iteration


def resolve_config(job: GenerateOptions) -> ResolvedConfig:
    """``--config`` wins, then ``--version``, then the config a diffusers folder carries or our checkpoint embeds,
    then the default version."""
    return resolve_model_config(
        job.config or None, job.version, checkpoint=job.ckpt_path or None, fallback_version=DEFAULT_VERSION
    )


def resolve_lora_scales(paths: list[str], scales: list[float] | None) -> list[float]:
    if not scales:
        return [1.0] * len(paths)
    if len(scales) != len(paths):
        raise GenerationError(
            f"--lora_scale given {len(scales)} times for {len(paths)} --lora_ckpt_path adapter(s); give one per adapter"
        )
    return [float(s) for s in scales]


def read_init_image(path: str | Path) -> np.ndarray:
    """The img2img start image as uint8 RGB [H, W, 3] (alpha dropped, grey expanded); a missing or unreadable file
    is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{path}: init image not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise GenerationError(f"{path}: cannot read the init image ({exc})") from exc


def check_img2img(job: GenerateOptions) -> np.ndarray | None:
    """The init image of an img2img job (None without one), after checking the options that go with it: the
    sampler can start part-way, the strength leaves steps to run, the image has the asked size."""
    if not job.init_image:
        if job.strength is not None:
            raise GenerationError(f"--strength {job.strength} needs --init_image")
        return None
    if job.sampler not in IMG2IMG_SAMPLER_NAMES:
        raise GenerationError(
            f"--sampler {job.sampler} cannot start from --init_image; use one of {', '.join(IMG2IMG_SAMPLER_NAMES)}"
        )
    img2img_start_step(job.sampling_steps, img2img_strength(job))
    image = read_init_image(job.init_image)
    height, width = image.shape[:2]
    if (job.H or height, job.W or width) != (height, width):
        raise GenerationError(
            f"{job.init_image}: init image is {width}x{height} (W x H) but --W {job.W or width} --H {job.H or height} "
            "were asked; give an image of that size or leave out --H/--W"
        )
    return image


def img2img_strength(job: GenerateOptions) -> float:
    return DEFAULT_STRENGTH if job.strength is None else job.strength


def validate_job(job: GenerateOptions) -> list[float]:
    """Checks that need no model (cheap, MindSpore-free: the CLI runs them before start-up); returns the scales."""
    if not job.prompts or not all(p.strip() for p in job.prompts):
        raise GenerationError("empty prompt")
    if job.sampler not in SAMPLER_NAMES:
        raise GenerationError(f"unknown sampler {job.sampler!r}; choose from {', '.join(SAMPLER_NAMES)}")
    for prompt in [*job.prompts, job.negative_prompt] if job.prompt_weighting else []:
        parse_prompt_weights(prompt)  # PromptSyntaxError naming the bracket's position
    if job.clip_skip < 0:
        raise GenerationError(f"--clip_skip {job.clip_skip} must be >= 0 (0: the last layer)")
    job.sampler_options()
    if job.sampling_steps < 1 or job.n_samples < 1 or job.n_iter < 1:
        raise GenerationError("--sampling_steps, --n_samples and --n_iter must be at least 1")
    for flag, value in (("--H", job.H), ("--W", job.W)):
        if value is not None and (value <= 0 or value % 8):
            raise GenerationError(f"{flag} {value} must be a positive multiple of 8")
    if job.attention_slice_size is not None and job.attention_slice_size < 0:
        raise GenerationError(f"--attention_slice_size {job.attention_slice_size} must be >= 0 (0: no slicing)")
    if job.vae_tile_latent_size < 0 or job.vae_tile_latent_size == 1:
        raise GenerationError(f"--vae_tile_latent_size {job.vae_tile_latent_size} must be 0 (off) or >= 2")
    check_img2img(job)
    resolve_policy(job.unet_precision(), job.vae_precision, job.text_encoder_precision)
    if job.ckpt_path and not Path(job.ckpt_path).exists():
        raise GenerationError(f"{job.ckpt_path}: checkpoint not found")
    if job.config:
        find_config_file(job.config)  # ConfigError naming the places looked in
    scales = resolve_lora_scales(job.adapters(), job.lora_scale)
    for path in job.adapters():
        if not Path(path).is_file():
            raise GenerationError(f"{path}: LoRA adapter file not found")
    return scales


# Options the compile cache's key leaves out: the prompt texts (graph_inputs keys them by their shapes) and the seeds
# and batch count (the noise is drawn in numpy and fed to the graphs; more batches repeat the same shapes).
NOT_IN_GRAPH_KEY = ("prompt", "prompts", "negative_prompt", "data_path", "seed", "seed_per_prompt", "n_iter")


def graph_inputs(job: GenerateOptions) -> dict:
    """What decides the run's compiled graphs and their order beside the options (the compile cache's key): the
    resolved model config, the init image's size, and of each prompt (in order) and the negative prompt its number
    of 75-token chunks and whether it carries weights (the text encoder's input shape and path), not its text."""
    from omegaconf import OmegaConf

    from ldm.prompt_encoding import prompt_chunks
    from ldm.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()

    def shape(prompt: str) -> list:
        rows, weights = prompt_chunks(tokenizer, prompt, job.prompt_weighting)
        return [int(rows.shape[0]), bool((weights != 1).any())]

    return {
        "model_config": OmegaConf.to_container(OmegaConf.create(resolve_config(job).config), resolve=True),
        "init_image": list(read_init_image(job.init_image).shape) if job.init_image else None,
        "prompts": [shape(p) for p in job.prompts],
        "negative_prompt": shape(job.negative_prompt),
    }


def _next_index(folder: Path, pattern: re.Pattern) -> int:
    found = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))] if folder.is_dir() else []
    return max(found) + 1 if found else 0


def default_settings(config) -> tuple[int, int, float]:
    """(height, width, guidance scale) a model config implies: its latent size times the VAE's downsampling factor
    (``2 ** (len(ch_mult) - 1)``) and the family's guidance scale, whatever the config's source."""
    params = model_node(config)["params"]
    vae_factor = 2 ** (len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    native = int(params.get("image_size", 64)) * vae_factor
    return native, native, DEFAULT_GUIDANCE[family_of_config(config)]


def size_and_scale(job: GenerateOptions, config, init_image: np.ndarray | None) -> tuple[int, int, float]:
    """(height, width, guidance scale) of a job: the options, else the init image's size, else the config's."""
    native_h, native_w, default_scale = default_settings(config)
    if init_image is not None:
        native_h, native_w = init_image.shape[:2]
    return job.H or native_h, job.W or native_w, default_scale if job.scale is None else job.scale


def plan_memory(job: GenerateOptions, log=print, warn=None) -> GenerateOptions:
    """``job`` with the memory plan's choice (``ldm.memory_plan``) for each of ``mode``, ``attention_slice_size``
    and ``vae_slicing`` left unset, logged in one line; a job that sets them all is returned as it is."""
    given = given_switches(job, GENERATION_SWITCHES)
    if all(value is not None for value in given.values()):
        return job
    config = resolve_config(job).config
    height, width, scale = size_and_scale(job, config, check_img2img(job))
    policy = resolve_policy(job.unet_precision(), job.vae_precision, job.text_encoder_precision)
    plan_job = GenerateJob(
        batch=job.n_samples,
        height=height,
        width=width,
        guided=scale != 1.0,
        precision=policy.unet,
        vae_precision=policy.vae,
        device_target=job.device_target,
    )
    decision = plan_generation(config, plan_job, given, *available_memory(job.device_target, job.max_memory_gib))
    if decision.fits:
        log(decision.log_line())
    else:
        (warn or _stderr)(f"warning: {decision.log_line()}")
    return apply_plan(job, decision)


def generate(job: GenerateOptions, log=print, warn=None) -> dict:
    """Run ``job``; returns a summary (written files, images, seconds, images/s)."""
    from tqdm import tqdm

    from ldm.io.model_io import load_pretrained
    from ldm.lora.merge import apply_adapters
    from ldm.models.diffusion import build_model_from_config
    from ldm.models.text_encoders import check_clip_skip
    from ldm.pipeline import GenerationSettings, Text2ImagePipeline, check_size, make_grid
    from ldm.precision import check_device_supports, config_with_policy, configure_attention, store_frozen_weights_low

    warn = warn or _stderr
    scales = validate_job(job)
    job = plan_memory(job, log, warn)
    init_image = check_img2img(job)
    resolved = resolve_config(job)
    config, config_label = resolved.config, resolved.label
    height, width, scale = size_and_scale(job, config, init_image)
    policy = resolve_policy(job.unet_precision(), job.vae_precision, job.text_encoder_precision)
    check_device_supports(policy)
    model = build_model_from_config(config_with_policy(config, policy), uninitialised=bool(job.ckpt_path))
    check_size(model, height, width)
    if job.ckpt_path:
        report = load_pretrained(model, job.ckpt_path, allow_pickle=job.allow_pickle)
        log(f"loaded {job.ckpt_path}: {report.summary()}")
    else:
        warn("WARNING: no --ckpt_path given: the model has RANDOM weights; the images are noise (smoke tests only)")
    adapters = list(zip(job.adapters(), scales))
    if adapters:
        apply_adapters(model, adapters, text_encoder=job.lora_ft_text_encoder, log=log)
        log("merged LoRA: " + ", ".join(f"{p} x {s:g}" for p, s in adapters))
    if not policy.is_fp32:
        for param in model.get_parameters():
            param.requires_grad = False
        store_frozen_weights_low(model, policy)  # after merging, so adapters add to the float32 weights
        log(f"precision: {policy.describe()}")
    configure_attention(model.model.diffusion_model, job.enable_flash_attention, warn=lambda m: warn(f"warning: {m}"))

    settings = GenerationSettings(
        sampler=job.sampler, steps=job.sampling_steps, scale=scale, height=height, width=width, eta=job.ddim_eta
    )
    clip_skip = check_clip_skip(job.clip_skip, model.cond_stage_model.layers)
    pipe = Text2ImagePipeline(
        model, job.sampler, clip_skip=clip_skip, prompt_weighting=job.prompt_weighting, **job.sampler_options()
    )
    pipe.set_memory_options(job.attention_slice_size, job.vae_slicing, job.vae_tile_latent_size)
    # Every prompt is known up front: encode them all, then free the text encoder's weights for the UNet and VAE.
    batches = [[prompt] * job.n_samples for prompt in job.prompts]
    if scale != 1.0:
        batches.append([job.negative_prompt] * job.n_samples)
    pipe.encode_ahead(batches)
    pipe.release_text_encoder()
    out = Path(job.output_path)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    index, grid_index = _next_index(samples, _NUMBERED), _next_index(out, _GRID)
    common = {
        "negative_prompt": job.negative_prompt,
        "sampler": job.sampler,
        **job.sampler_options(),
        "steps": job.sampling_steps,
        "scale": scale,
        "eta": job.ddim_eta,
        "clip_skip": job.clip_skip,
        "prompt_weighting": job.prompt_weighting,
        "init_image": job.init_image or None,
        "strength": img2img_strength(job) if job.init_image else None,
        "H": height,
        "W": width,
        "config": config_label,
        "ckpt_path": job.ckpt_path or None,
        "adapters": [{"path": p, "scale": s} for p, s in adapters],
        "lora_ft_text_encoder": job.lora_ft_text_encoder,
        "precision": policy.describe(),
    }
    written, grids, n_images, batch_seconds = [], [], 0, []
    bar = tqdm(total=len(job.prompts) * job.n_iter, desc="generating", unit="batch", file=sys.stderr)

    def on_step(step, _t, _x):
        bar.set_postfix_str(f"step {step + 1}/{job.sampling_steps}")

    for k, prompt in enumerate(job.prompts):
        batch = [prompt] * job.n_samples
        images_of_prompt = []
        for i in range(job.n_iter):
            seed = batch_seed(job, k, i)
            start = time.perf_counter()
            images = pipe(
                batch,
                [job.negative_prompt] * job.n_samples,
                settings=settings,
                seed=seed,
                callback=on_step,
                init_image=init_image,
                strength=img2img_strength(job),
            )
            batch_seconds.append(time.perf_counter() - start)
            for j, image in enumerate(images):
                png = samples / f"{index:05d}.png"
                save_image(png, image)
                meta = {"prompt": prompt, "seed": seed, "batch_index": j, "iteration": i, **common}
                write_json(png.with_suffix(".json"), meta)
                written.append(str(png))
                index += 1
            images_of_prompt.append(images)
            n_images += len(images)
            bar.update(1)
        grid = out / f"grid-{grid_index}.png"
        save_image(grid, make_grid(np.concatenate(images_of_prompt), rows=job.n_iter))
        grids.append(str(grid))
        grid_index += 1
    bar.close()
    sample_seconds = sum(batch_seconds)
    rate = n_images / sample_seconds if sample_seconds > 0 else float("inf")
    steady = ""
    if len(batch_seconds) > 1:  # the first batch compiles the graphs
        steady = f", {job.n_samples * (len(batch_seconds) - 1) / sum(batch_seconds[1:]):.3f} images/s after the first"
    log(f"{n_images} images in {sample_seconds:.1f}s ({rate:.3f} images/s{steady}); samples in {samples}")
    log("grids: " + ", ".join(grids))
    return {
        "samples": written,
        "grids": grids,
        "images": n_images,
        "seconds": sample_seconds,
        "images_per_second": rate,
        "settings": asdict(settings),
    }


__all__ = [
    "GenerationError",
    "default_settings",
    "generate",
    "resolve_config",
    "resolve_lora_scales",
    "validate_job",
]
