"""End to end: our text-to-image pipeline vs diffusers' StableDiffusionPipeline on the same tiny random weights.

The same initial latents, prompts, guidance scale and sampler configuration go through both (and for the stochastic
samplers the same noise: one torch generator seed, handed to diffusers' pipeline as its ``generator`` and to ours
behind numpy's ``standard_normal``, ``test_samplers.TorchNoise``); the final latents must agree to 1e-4 relative
(fp32 on both sides; 10 sampler steps each compound the ~1e-6 per-call UNet error and the float32 scheduler
arithmetic of diffusers vs our float64 coefficients), and the decoded uint8 images to within one grey level.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ldm.io.diffusers_format import read_diffusers_folder, write_diffusers_folder
from ldm.io.model_io import load_pretrained
from ldm.models.diffusion import build_model_from_config
from ldm.pipeline import GenerationSettings, Text2ImagePipeline, check_size, make_grid

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from test_samplers import TorchNoise  # noqa: E402
from tiny_diffusers import save_folder  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse", "a watercolor painting of a fox"]
NEGATIVE = ["", "blurry"]
KARRAS = {"use_karras_sigmas": True}


@pytest.fixture(scope="module", params=[("sd2", "v_prediction"), ("sd1", "epsilon")], ids=["sd2-v", "sd1-eps"])
def pair(request, tmp_path_factory):
    family, prediction = request.param
    src = tmp_path_factory.mktemp("src")
    save_folder(src, family=family, prediction_type=prediction)
    state, config = read_diffusers_folder(src)
    export = write_diffusers_folder(state, config, tmp_path_factory.mktemp("exp") / "pipe")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    model = build_model_from_config(config)
    load_pretrained(model, src)
    return ref, model


@pytest.mark.parametrize(
    "sampler, scheduler_cls, options",
    [
        ("dpm_solver_pp", "DPMSolverMultistepScheduler", {}),
        ("ddim", "DDIMScheduler", {}),
        ("euler_a", "EulerAncestralDiscreteScheduler", {}),
        pytest.param("heun", "HeunDiscreteScheduler", KARRAS, marks=pytest.mark.slow),  # 19 UNet calls
        (
            "dpm_solver_pp",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ),
    ],
    ids=["dpmpp_2m", "ddim", "euler_a", "heun_karras", "dpmpp_2m_sde_karras"],
)
def test_pipeline_matches_diffusers(pair, sampler, scheduler_cls, options):
    ref, model = pair
    spacing = {"timestep_spacing": "linspace"} if sampler in ("euler", "euler_a", "heun") else {}
    ref.scheduler = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config, **options, **spacing)
    settings = GenerationSettings(sampler=sampler, steps=10, scale=7.5, height=32, width=32)
    pipe = Text2ImagePipeline(model, sampler=sampler, **options)
    latents = pipe.initial_latents(len(PROMPTS), 32, 32, seed=3)
    noise = TorchNoise(11) if pipe.sampler.stochastic and sampler != "ddim" else None
    ours = pipe.sample_latents(PROMPTS, NEGATIVE, latents, settings, generator=noise).asnumpy()
    with torch.no_grad():
        theirs = ref(
            PROMPTS,
            negative_prompt=NEGATIVE,
            num_inference_steps=10,
            guidance_scale=7.5,
            height=32,
            width=32,
            latents=torch.from_numpy(latents),
            generator=torch.Generator().manual_seed(11),
            output_type="latent",
        ).images.numpy()
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err < 1e-4, err
    images = pipe.decode(ms_tensor(ours))
    with torch.no_grad():
        ref_img = ref.vae.decode(torch.from_numpy(theirs) / ref.vae.config.scaling_factor).sample.numpy()
    ref_u8 = np.round(np.clip((ref_img + 1) / 2, 0, 1).transpose(0, 2, 3, 1) * 255).astype(np.int16)
    assert np.abs(images.astype(np.int16) - ref_u8).max() <= 1


def ms_tensor(a):
    import mindspore as ms

    return ms.Tensor(a)


def test_seed_determinism_and_grid(pair):
    _, model = pair
    names = [p.name for p in model.get_parameters()]
    pipe = Text2ImagePipeline(model, sampler="dpm_solver_pp")
    settings = GenerationSettings(steps=4, scale=5.0, height=32, width=32)
    a = pipe(PROMPTS[:1], settings=settings, seed=7)
    b = pipe(PROMPTS[:1], settings=settings, seed=7)
    c = pipe(PROMPTS[:1], settings=settings, seed=8)
    assert a.dtype == np.uint8 and a.shape == (1, 32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    grid = make_grid(np.concatenate([a, c, a]), rows=1)
    assert grid.shape == (32, 96, 3) and np.array_equal(grid[:, 64:], a[0])
    # Generating renames nothing: adapters and checkpoints written afterwards (validation grids during training) are
    # keyed by these names.
    assert [p.name for p in model.get_parameters()] == names


def test_size_checks(pair):
    _, model = pair
    with pytest.raises(ValueError, match="multiples of 8"):
        check_size(model, 36, 32)
    check_size(model, 40, 32)  # tiny model: VAE x2, UNet x2
    sd = SimpleNamespace(latent_factor=8, unet_factor=8)  # full SD: 8 * 8
    check_size(sd, 768, 512)
    with pytest.raises(ValueError, match="multiples of 64"):
        check_size(sd, 520, 512)
