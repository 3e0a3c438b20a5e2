"""Text-to-image generation: prompts -> text contexts -> guided sampling in latent space -> decoded uint8 images.

In ``GRAPH_MODE`` each sampler step is one compiled call: the UNet on the batch [uncond; cond] together with the
classifier-free guidance combination (the latent batch, timestep and context shapes are fixed for a run, and the
guidance scale is an input, so it compiles once). The sampler's own update runs on host arrays (``ldm.samplers``).
In PyNative the UNet, the text encoder and the VAE run op by op: a compiled CPU graph keeps every intermediate
tensor alive (MindSpore 2.10; measured at full size in ``benchmarks/README.md``), while eager execution frees each
one after its last use, so PyNative is what lets a full-size model generate within a few GiB on CPU.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ldm.data.cache_networks import op_by_op
from ldm.names import SAMPLER_NAMES
from ldm.prompt_encoding import encode_prompts, same_length
from ldm.samplers import get_sampler
from ldm.schedule import img2img_start_step


class _Denoiser(nn.Cell):
    """The UNet as its own Cell so graph mode compiles exactly this call."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep the UNet's parameter names (adapters are saved by name)
        self.unet = model.model

    def construct(self, x, t, context):
        return self.unet(x, t, context)


class _GuidedDenoiser(nn.Cell):
    """One guided model call as one graph: the UNet on ``[x; x]`` with ``context = [uncond; cond]``, then
    ``uncond_out + scale * (cond_out - uncond_out)`` (what ``guided_model_fn`` does op by op)."""

    def __init__(self, denoise: _Denoiser):
        super().__init__(auto_prefix=False)
        self.denoise = denoise

    def construct(self, x, t, context, scale):
        out = self.denoise(ops.cat((x, x), axis=0), ops.cat((t, t), axis=0), context)
        out_u, out_c = ops.split(out, x.shape[0], axis=0)
        return out_u + scale.astype(out.dtype) * (out_c - out_u)


@dataclass
class GenerationSettings:
    sampler: str = "dpm_solver_pp"
    steps: int = 20
    scale: float = 9.0
    height: int = 512
    width: int = 512
    eta: float = 0.0


def check_size(model, height: int, width: int) -> None:
    """Pixel sizes must map to latents the UNet can halve and double back (64 for SD, 8 at the least)."""
    if height % 8 or width % 8:
        raise ValueError(f"--H {height} and --W {width} must be multiples of 8")
    step = model.latent_factor * model.unet_factor
    if height % step or width % step:
        raise ValueError(f"--H {height} and --W {width} must be multiples of {step} for this model")


class Text2ImagePipeline:
    """Generate images from prompts with a ``LatentDiffusion`` model and one of the samplers.

    Prompts may be longer than the text encoder's 77 tokens and, with ``prompt_weighting``, carry ``(word:1.3)``
    weights (:mod:`ldm.prompt_encoding`); ``clip_skip`` k conditions on the text encoder's layer k before the last
    (diffusers' ``clip_skip``)."""

    def __init__(
        self,
        model,
        sampler: str = "dpm_solver_pp",
        clip_skip: int = 0,
        prompt_weighting: bool = False,
        **sampler_options,
    ):
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLER_NAMES)}")
        self.model = model
        self.clip_skip = clip_skip
        self.prompt_weighting = prompt_weighting
        self.empty_chunk: Tensor | None = None  # the empty text's context, to pad contexts of different lengths
        self.sampler = get_sampler(
            sampler, prediction_type=model.parameterization, alphas_cumprod=model.alphas_cumprod, **sampler_options
        )
        self.denoise = _Denoiser(model)
        self.guided_denoise = _GuidedDenoiser(self.denoise)
        self.contexts: dict[tuple[str, ...], Tensor] = {}

    def set_memory_options(
        self, attention_slice_size: int = 0, vae_slicing: bool = False, vae_tile_latent_size: int = 0
    ) -> None:
        """Workspace savers, all off by default: attention over ``attention_slice_size`` (batch x head) rows at a
        time and one-image-at-a-time VAE decode leave the images unchanged (float32 rounding); VAE decode in
        overlapping tiles of ``vae_tile_latent_size`` latent pixels changes them slightly (``autoencoder.py``)."""
        self.model.model.diffusion_model.set_attention_slice_size(attention_slice_size)
        self.model.first_stage_model.set_decode_memory_options(vae_slicing, vae_tile_latent_size)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text contexts of a batch of prompts: the one ``encode_ahead`` stored for this batch, else encoded now."""
        key = tuple(prompts)
        if key in self.contexts:
            return self.contexts[key]
        embedder = self.model.cond_stage_model
        if embedder is None:
            raise ValueError(f"the text encoder was released and the prompts {list(prompts)} were not encoded ahead")
        context = encode_prompts(embedder, list(prompts), self.clip_skip, self.prompt_weighting)
        if context.shape[1] > embedder.max_length and self.empty_chunk is None:
            self.empty_chunk = encode_prompts(embedder, [""], self.clip_skip)
        return context

    def encode_ahead(self, prompt_batches: list[list[str]]) -> None:
        """Encode now every batch of prompts a run will sample (the same batches, so the same contexts), so that
        the text encoder can be released before the UNet and VAE need memory."""
        for batch in prompt_batches:
            self.contexts[tuple(batch)] = self.encode_prompts(batch)

    def release_text_encoder(self) -> None:
        """Drop the text encoder and its weights (1.3 GiB in fp32 for SD2's OpenCLIP-H, 0.5 GiB for SD1's CLIP-L);
        only batches given to ``encode_ahead`` can be sampled afterwards. The Cells' reference cycles keep the
        weights alive until a garbage collection, so one runs here (measured: without it nothing is freed)."""
        self.model.cond_stage_model = None
        gc.collect()

    def initial_latents(self, batch: int, height: int, width: int, seed: int) -> np.ndarray:
        f = self.model.latent_factor
        shape = (batch, self.model.channels, height // f, width // f)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def image_latents(self, image: np.ndarray, posterior_noise: np.ndarray) -> np.ndarray:
        """Scaled VAE latents [N, C, h, w] of one uint8 image [H, W, 3]: a posterior sample per row of
        ``posterior_noise`` [N, C, h, w] (diffusers' img2img draws one, N = 1, and repeats it over the batch)."""
        pixels = image.astype(np.float32)[None].transpose(0, 3, 1, 2) / 255.0 * 2.0 - 1.0
        with op_by_op():  # one encode per batch: eager, so no encoder graph is compiled (nor kept alive)
            mean, logvar = self.model.encode_first_stage(Tensor(pixels))
        return self.model.get_first_stage_encoding(mean, logvar, Tensor(posterior_noise)).asnumpy()

    def img2img_latents(
        self,
        image: np.ndarray,
        batch: int,
        strength: float,
        steps: int,
        seed: int = 0,
        noise: np.ndarray | None = None,
        posterior_noise: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int]:
        """(start latents, start step) of an img2img run: ``image`` encoded, noised to the level of step
        ``steps - int(steps * strength)`` (diffusers' ``StableDiffusionImg2ImgPipeline``). ``noise`` defaults to the
        text-to-image initial latents of ``seed``, ``posterior_noise`` to one draw ``[1, C, h, w]`` of
        ``default_rng([seed, 2])`` shared by the batch."""
        start = img2img_start_step(steps, strength)
        alpha, sigma = self.sampler.start_scales(steps, start)
        h, w = image.shape[:2]
        if noise is None:
            noise = self.initial_latents(batch, h, w, seed)
        if posterior_noise is None:
            shape = (1, *noise.shape[1:])
            posterior_noise = np.random.default_rng([seed, 2]).standard_normal(shape, dtype=np.float32)
        x0 = self.image_latents(image, posterior_noise)
        return x0 * np.float32(alpha) + noise * np.float32(sigma), start

    def sample_latents(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        latents: np.ndarray,
        settings: GenerationSettings,
        seed: int = 0,
        callback=None,
        generator=None,
        start_step: int = 0,
    ) -> Tensor:
        """Run the sampler from ``latents`` (x_T, or the noised image at ``start_step``) with classifier-free
        guidance; returns x_0 latents. A stochastic sampler draws its noise from ``generator`` (default: a numpy
        generator seeded with ``seed + 1``)."""
        cond = self.encode_prompts(prompts)
        if settings.scale == 1.0:
            context, model_fn = cond, self.denoise
        else:
            uncond, cond = same_length(self.encode_prompts(negative_prompts), cond, self.empty_chunk)
            context = ops.cat((uncond, cond), axis=0)
            scale = Tensor(settings.scale, dtype=ms.float32)

            def model_fn(x, t, ctx):
                return self.guided_denoise(x, t, ctx, scale)

        extra = {"eta": settings.eta} if settings.sampler == "ddim" else {}
        if self.sampler.stochastic:
            extra["generator"] = np.random.default_rng(seed + 1) if generator is None else generator
        if start_step:
            extra["start_step"] = start_step
        return self.sampler.sample(
            model_fn, Tensor(latents), context, num_steps=settings.steps, callback=callback, **extra
        )

    def decode(self, latents: Tensor) -> np.ndarray:
        """Latents -> uint8 images [B, H, W, 3]."""
        images = self.model.decode_first_stage(latents).asnumpy()
        images = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
        return np.round(images.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)

    def __call__(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        settings: GenerationSettings | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
        callback=None,
        init_image: np.ndarray | None = None,
        strength: float = 0.8,
    ) -> np.ndarray:
        """uint8 images [B, H, W, 3]; with ``init_image`` (uint8 [H, W, 3] of the settings' size) img2img at
        ``strength`` (see :meth:`img2img_latents`)."""
        settings = settings or GenerationSettings()
        check_size(self.model, settings.height, settings.width)
        negative_prompts = list(negative_prompts or [""] * len(prompts))
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        start = 0
        if init_image is not None:
            if init_image.shape != (settings.height, settings.width, 3):
                raise ValueError(
                    f"init image of {init_image.shape[1]}x{init_image.shape[0]} (W x H) for images of "
                    f"{settings.width}x{settings.height}"
                )
            latents, start = self.img2img_latents(init_image, len(prompts), strength, settings.steps, seed)
        elif latents is None:
            latents = self.initial_latents(len(prompts), settings.height, settings.width, seed)
        x0 = self.sample_latents(
            prompts, negative_prompts, latents, settings, seed=seed, callback=callback, start_step=start
        )
        return self.decode(x0)


def make_grid(images: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Tile [N, H, W, 3] images into one image, ``rows`` rows (default: about square)."""
    n, h, w, c = images.shape
    rows = rows or int(np.floor(np.sqrt(n))) or 1
    cols = -(-n // rows)
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid
