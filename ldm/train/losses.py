"""The denoising training loss and the single random source it draws from.

``DiffusionLoss`` is the per-batch objective of SD 1.x/2.x fine-tuning: noise the clean latents to a random timestep
(q_sample), ask the denoiser for eps or v, and take the MSE per sample, optionally weighted by Min-SNR-gamma
(Hang et al. 2023, as in diffusers' ``train_text_to_image_lora.py``) and with offset noise (diffusers
``--noise_offset``). Every random draw of a training step (timesteps, noise, offset noise, and whatever else the
caller needs such as the VAE posterior noise) comes from one host-side ``NoiseSampler`` so a test can fix it and a
checkpoint can store its exact state. Per-timestep tables are computed in float64 with numpy, then cast to float32.

The Cells the training step runs around it live here too: ``LDMTrainLoss`` (the loss of a ``LatentDiffusion`` on
latents and text) and the frozen VAE encode of a batch (``LatentEncoder``, or ``CachedLatents`` from cached moments).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

PARAMETERIZATIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "velocity": "v"}


def canonical_parameterization(name: str) -> str:
    """``eps`` or ``v`` for any of the spellings used by LDM (``velocity``) and diffusers (``v_prediction``)."""
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {sorted(PARAMETERIZATIONS)}, got {name!r}")
    return PARAMETERIZATIONS[name]


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Signal-to-noise ratio ab / (1 - ab) per timestep, float64."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    return ab / (1.0 - ab)


def min_snr_weights(alphas_cumprod: np.ndarray, gamma: float | None, parameterization: str) -> np.ndarray:
    """Per-timestep loss weight, float64: 1 without gamma; min(snr, gamma) / snr for eps and
    min(snr, gamma) / (snr + 1) for v (the MSE on v equals (snr + 1) times the MSE on x0-scaled eps)."""
    s = snr(alphas_cumprod)
    if gamma is None:
        return np.ones_like(s)
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    clipped = np.minimum(s, float(gamma))
    return clipped / s if canonical_parameterization(parameterization) == "eps" else clipped / (s + 1.0)


class DiffusionLoss(nn.Cell):
    """Scalar training loss of a denoiser ``f(x_t, t, context)``.

    construct(x0, context, t, noise, offset_noise):
      x0 [B, C, H, W] clean (scaled) latents; context: whatever the denoiser takes as conditioning;
      t [B] int32 timesteps; noise like x0; offset_noise [B, C, 1, 1] (ignored when ``noise_offset`` is 0).
    Returns mean over the batch of weight(t) * mean((f(x_t, t, context) - target)^2) over C, H, W, in float32.
    """

    def __init__(
        self,
        denoiser: nn.Cell,
        alphas_cumprod: np.ndarray,
        parameterization: str = "eps",
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
    ):
        # auto_prefix=False: wrapping must not rename the denoiser's parameters (they keep e.g.
        # ``model.diffusion_model.*``, which LoRA export and checkpoints rely on)
        super().__init__(auto_prefix=False)
        ab = np.asarray(alphas_cumprod, dtype=np.float64)
        self.denoiser = denoiser
        self.parameterization = canonical_parameterization(parameterization)
        self.noise_offset = float(noise_offset)
        self.use_weights = snr_gamma is not None
        self.sqrt_ab = Tensor(np.sqrt(ab), ms.float32)
        self.sqrt_one_minus_ab = Tensor(np.sqrt(1.0 - ab), ms.float32)
        self.weights = Tensor(min_snr_weights(ab, snr_gamma, self.parameterization), ms.float32)

    loss_parts: tuple[str, ...] = ()  # names of the terms a subclass returns beside the loss (see ``TrainStep``)

    def construct(self, x0, context, t, noise, offset_noise):
        return self.per_sample(x0, context, t, noise, offset_noise).mean()

    def per_sample(self, x0, context, t, noise, offset_noise):
        """The weighted per-sample losses [B] whose mean ``construct`` returns."""
        x0 = x0.astype(ms.float32)
        noise = noise.astype(ms.float32)
        if self.noise_offset != 0.0:
            noise = noise + self.noise_offset * offset_noise.astype(ms.float32)
        a = ops.gather(self.sqrt_ab, t, 0).reshape(-1, 1, 1, 1)
        s = ops.gather(self.sqrt_one_minus_ab, t, 0).reshape(-1, 1, 1, 1)
        x_t = a * x0 + s * noise
        target = noise if self.parameterization == "eps" else a * noise - s * x0
        pred = self.denoiser(x_t, t, context).astype(ms.float32)
        per_sample = ops.square(pred - target).mean(axis=(1, 2, 3))
        if self.use_weights:
            per_sample = per_sample * ops.gather(self.weights, t, 0)
        return per_sample


class PriorPreservationLoss(DiffusionLoss):
    """DreamBooth's loss: the batch is B instance rows then B class rows; returns ``(instance_loss +
    prior_loss_weight * prior_loss, [instance_loss, prior_loss])``, each term the mean over its half (diffusers'
    ``train_dreambooth_lora.py`` splits the prediction and target with ``torch.chunk`` the same way)."""

    loss_parts = ("instance_loss", "prior_loss")

    def __init__(self, *args, prior_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_loss_weight = float(prior_loss_weight)

    def construct(self, x0, context, t, noise, offset_noise):
        per_sample = self.per_sample(x0, context, t, noise, offset_noise)
        half = per_sample.shape[0] // 2
        instance, prior = per_sample[:half].mean(), per_sample[half:].mean()
        return instance + self.prior_loss_weight * prior, ops.stack((instance, prior))


class LDMTrainLoss(nn.Cell):
    """Diffusion loss of the (LoRA-)UNet on VAE latents ``x0``; ``text`` is the text context, or the token ids
    when the text encoder trains (``encode_text``) and so must run inside the differentiated step. With
    ``prior_loss_weight`` it is DreamBooth's :class:`PriorPreservationLoss`."""

    def __init__(self, ldm, snr_gamma, noise_offset, encode_text: bool = False, prior_loss_weight=None):
        super().__init__(auto_prefix=False)
        self.ldm = ldm
        self.encode_text = encode_text
        args = (ldm.model, ldm.alphas_cumprod, ldm.parameterization, snr_gamma, noise_offset)
        if prior_loss_weight is None:
            self.loss = DiffusionLoss(*args)
        else:  # DreamBooth: instance rows then class rows, both terms reported
            self.loss = PriorPreservationLoss(*args, prior_loss_weight=prior_loss_weight)
        self.loss_parts = self.loss.loss_parts

    def construct(self, x0, text, t, noise, offset):
        context = self.ldm.get_learned_conditioning(text) if self.encode_text else text
        return self.loss(x0, context, t, noise, offset)


class LatentEncoder(nn.Cell):
    """The frozen VAE encode of a batch (a posterior sample, scaled), run before and outside the training step.

    The step differentiates only the UNet (and the text encoder when it trains), so the VAE's activations are never
    kept for a backward pass that would not use them.
    """

    def __init__(self, ldm):
        super().__init__(auto_prefix=False)
        self.ldm = ldm

    def construct(self, images, post_noise):
        mean, logvar = self.ldm.encode_first_stage(images)
        return self.ldm.get_first_stage_encoding(mean, logvar, post_noise)


class CachedLatents(nn.Cell):
    """A posterior sample, scaled, from cached moments: the same ops as :class:`LatentEncoder` after its encode."""

    def __init__(self, ldm):
        super().__init__(auto_prefix=False)
        self.ldm = ldm
        self.channels = ldm.channels

    def construct(self, moments, post_noise):
        mean, logvar = ops.split(moments, self.channels, axis=1)
        return self.ldm.get_first_stage_encoding(mean, logvar, post_noise)


class NoiseSampler:
    """Seedable host-side source of every random draw of a training step (numpy PCG64).

    Drawing on the host keeps the graph free of stateful random ops, so the draws can be fixed in tests and saved
    and restored exactly with a checkpoint (``get_state``/``set_state`` give a JSON-able dict). Under data
    parallelism seed each rank differently (e.g. ``seed + rank``).
    """

    def __init__(self, seed: int, num_timesteps: int = 1000):
        self.num_timesteps = int(num_timesteps)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def draw(self, latent_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(t int32 [B] uniform in [0, T), noise float32 latent_shape, offset_noise float32 [B, C, 1, 1])."""
        b, c = latent_shape[0], latent_shape[1]
        t = self.rng.integers(0, self.num_timesteps, size=(b,), dtype=np.int64).astype(np.int32)
        noise = self.rng.standard_normal(latent_shape, dtype=np.float32)
        offset = self.rng.standard_normal((b, c, 1, 1), dtype=np.float32)
        return Tensor(t), Tensor(noise), Tensor(offset)

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        """Extra standard-normal draw (e.g. the VAE posterior sample) from the same stream."""
        return Tensor(self.rng.standard_normal(shape, dtype=np.float32))

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
