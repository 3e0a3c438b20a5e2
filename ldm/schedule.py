"""The discrete DDPM noise schedule shared by training and every sampler.

Stable Diffusion's "linear" schedule in the original LDM code is diffusers' ``scaled_linear``: betas are linear in
sqrt-space between ``linear_start`` and ``linear_end``. Everything is computed in float64 with numpy so training,
samplers and the reference implementations see the same numbers.
"""

from __future__ import annotations

import numpy as np

SD_LINEAR_START = 0.00085
SD_LINEAR_END = 0.012
SD_TIMESTEPS = 1000


def make_betas(
    schedule: str = "scaled_linear",
    timesteps: int = SD_TIMESTEPS,
    linear_start: float = SD_LINEAR_START,
    linear_end: float = SD_LINEAR_END,
) -> np.ndarray:
    """Betas for ``schedule`` in float64: ``scaled_linear`` (SD; LDM calls it "linear") or ``linear``."""
    if schedule in ("scaled_linear", "sqrt_linear_ldm"):
        return np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    if schedule == "linear":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected 'scaled_linear' or 'linear'")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """Cumulative product of (1 - beta): the signal fraction alpha_bar_t, float64."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def img2img_start_step(num_steps: int, strength: float) -> int:
    """First step an img2img run takes of ``num_steps``: diffusers' ``num_steps - int(num_steps * strength)`` (the
    image is noised to that step's level; strength 1 starts from pure noise). Raises ValueError for a strength
    outside (0, 1] or one that leaves no step to run."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength {strength} must be in (0, 1]")
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise ValueError(
            f"--strength {strength} with --sampling_steps {num_steps} runs int({num_steps} * {strength}) = 0 steps; "
            "raise either"
        )
    return num_steps - kept
