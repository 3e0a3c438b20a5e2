"""``LatentDiffusion``: the Stable Diffusion model as one Cell with original-LDM parameter names.

Children are named as in CompVis/Stability checkpoints: ``model.diffusion_model`` (UNet), ``first_stage_model``
(KL-VAE), ``cond_stage_model`` (CLIP/OpenCLIP text encoder). The DDPM schedule is held as constant tensors, not
parameters, so it never appears in a state dict (``ldm.io.model_io`` drops the schedule buffers Stability files carry).
"""

from __future__ import annotations

from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ldm.models.layers import uninitialised_parameters
from ldm.schedule import SD_LINEAR_END, SD_LINEAR_START, SD_TIMESTEPS, alphas_cumprod, make_betas
from ldm.util import instantiate_from_config

PARAMETERIZATIONS = {"eps": "eps", "v": "v", "velocity": "v"}


class DiffusionWrapper(nn.Cell):
    """Holds the UNet as ``diffusion_model`` so its parameters are ``model.diffusion_model.*``."""

    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, t, context):
        return self.diffusion_model(x, t, context)


class LatentDiffusion(nn.Cell):
    """UNet + VAE + text encoder with the DDPM forward process (q_sample, v-target) of SD 1.x/2.x.

    parameterization: what the UNet predicts, ``eps`` (SD1, SD2-base) or ``v`` (SD2.x-768); ``velocity`` is
    accepted as mindone's spelling of ``v``.
    """

    def __init__(
        self,
        unet_config: dict,
        first_stage_config: dict,
        cond_stage_config: dict,
        parameterization: str = "eps",
        beta_schedule: str = "scaled_linear",
        linear_start: float = SD_LINEAR_START,
        linear_end: float = SD_LINEAR_END,
        timesteps: int = SD_TIMESTEPS,
        scale_factor: float = 0.18215,
        image_size: int = 64,
        channels: int = 4,
    ):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {sorted(PARAMETERIZATIONS)}, got {parameterization!r}")
        self.parameterization = PARAMETERIZATIONS[parameterization]
        self.scale_factor = float(scale_factor)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.num_timesteps = int(timesteps)
        self.latent_factor = 2 ** (len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1)
        self.unet_factor = 2 ** (len(unet_config["params"].get("channel_mult", (1, 2, 4, 8))) - 1)
        self.model = DiffusionWrapper(instantiate_from_config(unet_config))
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        for p in self.first_stage_model.get_parameters():
            p.requires_grad = False
        for p in self.cond_stage_model.get_parameters():
            p.requires_grad = False

        self.betas = make_betas(beta_schedule, timesteps, linear_start, linear_end)
        self.alphas_cumprod = alphas_cumprod(self.betas)
        self.sqrt_alphas_cumprod = Tensor(np.sqrt(self.alphas_cumprod), ms.float32)
        self.sqrt_one_minus_alphas_cumprod = Tensor(np.sqrt(1.0 - self.alphas_cumprod), ms.float32)

    @property
    def context_dim(self) -> int:
        return int(self.cond_stage_model.context_dim)

    def _extract(self, table: Tensor, t: Tensor, ndim: int) -> Tensor:
        return ops.gather(table, t, 0).reshape((-1,) + (1,) * (ndim - 1))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process: sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def get_v(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v-prediction target: sqrt(ab_t) * noise - sqrt(1 - ab_t) * x0."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
        )

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise if self.parameterization == "eps" else self.get_v(x0, noise, t)

    def apply_model(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.model(x_t, t, context)

    def construct(self, x_t, t, context):
        return self.model(x_t, t, context)

    def encode_first_stage(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] -> (mean, logvar) of the VAE posterior (unscaled)."""
        return self.first_stage_model.encode(images)

    def get_first_stage_encoding(self, mean: Tensor, logvar: Tensor, noise: Tensor | None = None) -> Tensor:
        """Scaled latent: a posterior sample (or its mean when ``noise`` is None) times ``scale_factor``."""
        z = mean if noise is None else mean + ops.exp(0.5 * logvar) * noise
        return z * self.scale_factor

    def decode_first_stage(self, z: Tensor) -> Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, token_ids: Tensor) -> Tensor:
        return self.cond_stage_model(token_ids)

    def tokenize(self, texts: list[str]) -> np.ndarray:
        return self.cond_stage_model.tokenize(texts)


def build_model_from_config(config: Any, uninitialised: bool = False) -> LatentDiffusion:
    """Build the network described by a config's ``model`` node (a full config or the node itself).

    uninitialised: leave every parameter without a value, for a checkpoint load to fill
    (:func:`ldm.io.model_io.load_pretrained` does, and initialises any parameter the file does not hold); the model
    then never holds random weights and the file's weights at the same time.
    """
    node = config["model"] if "model" in config else config
    if not uninitialised:
        return instantiate_from_config(node)
    with uninitialised_parameters():
        return instantiate_from_config(node)
