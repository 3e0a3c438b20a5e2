"""Euler ancestral ("Euler a", the WebUI's default): an Euler step down to ``sigma_down``, then fresh noise back up
to ``sigma_i+1``, so each step forgets part of the path (stochastic; a seed fixes it).

With ``sigma_up = sqrt(sigma_i+1^2 (sigma_i^2 - sigma_i+1^2) / sigma_i^2)`` and
``sigma_down = sqrt(sigma_i+1^2 - sigma_up^2)`` (DDPM's ancestral step, eta = 1):

    x <- (sigma_down / sigma_i) x + (1 - sigma_down / sigma_i) x0 + sigma_up z,    z ~ N(0, I)

Settings follow diffusers' ``EulerAncestralDiscreteScheduler`` as loaded for SD (``timestep_spacing="linspace"``).
One ``z`` is drawn per step, the last included (where sigma_up = 0), in step order, as diffusers draws it.
That scheduler has no Karras option (nor has the WebUI an "Euler a Karras"), so neither has this sampler: a
schedule no reference checks would be a guess.
"""

from __future__ import annotations

import numpy as np

from ldm.samplers.base import SigmaSampler, draw_noise, lincomb


def ancestral_sigmas(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of one ancestral step from ``sigma_from`` to ``sigma_to``."""
    up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    return float(np.sqrt(sigma_to**2 - up**2)), float(up)


class EulerAncestralSampler(SigmaSampler):
    """Euler ancestral on the "linspace" sigma grid of :func:`~ldm.samplers.base.euler_schedule`."""

    name = "euler_a"
    stochastic = True

    def __init__(
        self, prediction_type: str = "eps", alphas_cumprod: np.ndarray | None = None, use_karras_sigmas: bool = False
    ):
        if use_karras_sigmas:
            raise ValueError(
                "use_karras_sigmas does not apply to euler_a: diffusers' EulerAncestralDiscreteScheduler has no Karras "
                "schedule; use euler, heun or dpm_solver_pp with Karras sigmas"
            )
        super().__init__(prediction_type, alphas_cumprod)

    def step(self, denoise, x: np.ndarray, i: int, timesteps, sigmas, generator) -> np.ndarray:
        x0 = denoise(x, sigmas[i], timesteps[i])
        down, up = ancestral_sigmas(sigmas[i], sigmas[i + 1])
        ratio = down / sigmas[i]
        return lincomb((ratio, 1.0 - ratio, up), (x, x0, draw_noise(generator, x)))
