"""img2img: our pipeline vs diffusers' StableDiffusionImg2ImgPipeline on the same tiny random weights and noise.

Both start from the same init image and the same two normal draws (the posterior sample of the VAE encoding, then
the noise added at the first kept timestep), drawn from a seeded torch generator in diffusers' order and handed to
ours. The final latents must agree to 1e-4 relative: the tolerance of ``tests/test_pipeline.py`` (fp32 on both
sides; the VAE encoder adds its ~1e-6 per-call error to the UNet's, compounded over the steps run).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
from ldm.io.model_io import load_pretrained
from ldm.models.diffusion import build_model_from_config
from ldm.names import IMG2IMG_SAMPLER_NAMES, SAMPLER_NAMES
from ldm.pipeline import GenerationSettings, Text2ImagePipeline
from ldm.schedule import img2img_start_step

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tiny_diffusers import save_folder  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse", "a watercolor painting of a fox"]
NEGATIVE = ["", "blurry"]
SIZE, STEPS = 32, 10
SCHEDULERS = {
    "dpm_solver_pp": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family -> (diffusers img2img pipeline, our model) on the same tiny random weights, built once each:
    SD1 with eps prediction, SD2 with v prediction."""
    built = {}

    def get(family: str):
        if family not in built:
            src = tmp_path_factory.mktemp("src")
            save_folder(src, family=family, prediction_type="epsilon" if family == "sd1" else "v_prediction")
            state, config = read_diffusers_folder(src)
            export = write_diffusers_folder(state, config, tmp_path_factory.mktemp("exp") / "pipe")
            ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
                export, safety_checker=None, requires_safety_checker=False
            )
            model = build_model_from_config(config)
            load_pretrained(model, src)
            built[family] = ref, model
        return built[family]

    return get


def _init_image() -> np.ndarray:
    """A smooth colour gradient with a square: an image, not noise, so the VAE posterior is meaningful."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    image = np.stack([x, y, 1 - x * y], axis=-1) * 255
    image[8:20, 10:22] = (200, 40, 40)
    return image.round().astype(np.uint8)


@pytest.mark.parametrize(
    "family, sampler, strength",
    [
        ("sd1", "dpm_solver_pp", 0.5),
        ("sd1", "dpm_solver_pp", 0.75),
        ("sd1", "unipc", 0.75),
        ("sd2", "ddim", 0.5),
        ("sd2", "dpm_solver_pp", 0.75),
    ],
)
def test_img2img_matches_diffusers(pairs, family, sampler, strength):
    """Two strengths of the default sampler, the other img2img samplers once, eps (SD1) and v (SD2) models."""
    ref, model = pairs(family)
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    image = _init_image()
    latent_shape = (len(PROMPTS), 4, SIZE // model.latent_factor, SIZE // model.latent_factor)
    gen = torch.Generator().manual_seed(11)
    posterior_noise = torch.randn((1, *latent_shape[1:]), generator=gen).numpy()
    noise = torch.randn(latent_shape, generator=gen).numpy()
    pipe = Text2ImagePipeline(model, sampler=sampler)
    start_latents, start = pipe.img2img_latents(
        image, len(PROMPTS), strength, STEPS, noise=noise, posterior_noise=posterior_noise
    )
    assert start == STEPS - int(STEPS * strength)
    settings = GenerationSettings(sampler=sampler, steps=STEPS, scale=7.5, height=SIZE, width=SIZE)
    steps_run = []
    ours = pipe.sample_latents(
        PROMPTS, NEGATIVE, start_latents, settings, start_step=start, callback=lambda i, t, x: steps_run.append(t)
    ).asnumpy()
    calls = []
    with torch.no_grad():
        theirs = ref(
            PROMPTS,
            image=Image.fromarray(image),
            strength=strength,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11),
            output_type="latent",
            callback_on_step_end=lambda p, i, t, kw: calls.append(int(t)) or {},
        ).images.numpy()
    assert steps_run == calls and len(calls) == int(STEPS * strength)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{family} {sampler} strength {strength}: rel err {err:.2e}")
    assert err < 1e-4, err


def test_strength_one_is_text_to_image_noise_level(pairs):
    """Strength 1 starts at the first timestep: x = alpha_0 x0 + sigma_0 noise with alpha_0 ~ 0.07 (SD's
    schedule), so the run is nearly text-to-image from the same noise but still sees the image."""
    _, model = pairs("sd1")
    pipe = Text2ImagePipeline(model)
    noise = pipe.initial_latents(1, SIZE, SIZE, seed=3)
    start_latents, start = pipe.img2img_latents(_init_image(), 1, 1.0, STEPS, seed=3)
    alpha, sigma = pipe.sampler.start_scales(STEPS, 0)
    assert start == 0 and 0.05 < alpha < 0.1 and sigma > 0.99
    assert np.abs(start_latents - sigma * noise).max() > 1e-3


def test_img2img_bad_input(pairs):
    _, model = pairs("sd1")
    image = _init_image()
    settings = GenerationSettings(steps=STEPS, height=SIZE, width=SIZE)
    pipe = Text2ImagePipeline(model)
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"--strength {strength} must be in \(0, 1\]"):
            pipe(PROMPTS[:1], settings=settings, init_image=image, strength=strength)
    with pytest.raises(ValueError, match=r"int\(10 \* 0.05\) = 0 steps"):
        pipe(PROMPTS[:1], settings=settings, init_image=image, strength=0.05)
    with pytest.raises(ValueError, match="init image of 32x24 .W x H. for images of 32x32"):
        pipe(PROMPTS[:1], settings=settings, init_image=image[:24], strength=0.5)
    plms = Text2ImagePipeline(model, sampler="plms")
    with pytest.raises(ValueError, match="sampler 'plms' cannot start from an image"):
        plms(PROMPTS[:1], settings=GenerationSettings("plms", STEPS, 7.5, SIZE, SIZE), init_image=image)


def test_img2img_sampler_list_is_what_samplers_support():
    """``ldm.names.IMG2IMG_SAMPLER_NAMES`` (checked by the CLI before start-up) is exactly the samplers that start
    part-way."""
    from ldm.samplers import get_sampler

    supported = []
    for name in SAMPLER_NAMES:
        try:
            get_sampler(name).start_scales(STEPS, 3)
            supported.append(name)
        except ValueError:
            pass
    assert tuple(supported) == IMG2IMG_SAMPLER_NAMES
    assert img2img_start_step(20, 0.35) == 13 and img2img_start_step(20, 1.0) == 0
