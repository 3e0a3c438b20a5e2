"""Euler (Karras et al., 2022, Algorithm 2 without churn): one model call per step, first order.

Each step moves along the probability-flow ODE ``dx/dsigma = (x - x0) / sigma`` from sigma_i to sigma_i+1:

    x <- x + (sigma_i+1 - sigma_i) (x - x0) / sigma_i = (sigma_i+1 / sigma_i) x + (1 - sigma_i+1 / sigma_i) x0

Settings follow diffusers' ``EulerDiscreteScheduler`` as loaded for SD (``timestep_spacing="linspace"``,
``interpolation_type="linear"``, ``s_churn=0``, ``final_sigmas_type="zero"``), "Euler" in the WebUI;
``use_karras_sigmas`` gives "Euler Karras". Deterministic.
"""

from __future__ import annotations

import numpy as np

from ldm.samplers.base import SigmaSampler, lincomb


class EulerSampler(SigmaSampler):
    """Euler on the sigma grid of :func:`~ldm.samplers.base.euler_schedule`."""

    name = "euler"

    def step(self, denoise, x: np.ndarray, i: int, timesteps, sigmas, generator) -> np.ndarray:
        ratio = sigmas[i + 1] / sigmas[i]
        return lincomb((ratio, 1.0 - ratio), (x, denoise(x, sigmas[i], timesteps[i])))
