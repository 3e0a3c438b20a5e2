"""Heun (Karras et al., 2022, Algorithm 1 without churn): an Euler step, then the model again at its end point and
the two slopes averaged (second order, two model calls per step, one on the last).

From sigma_i to sigma_i+1 with ``d(x, x0, sigma) = (x - x0) / sigma`` and ``dt = sigma_i+1 - sigma_i``:

    x' = x + dt d(x, x0_i, sigma_i)
    x <- x + dt/2 (d(x, x0_i, sigma_i) + d(x', x0', sigma_i+1))      (x0' predicted at x', sigma_i+1)

The last step (to sigma = 0) is the Euler step alone. Settings follow diffusers' ``HeunDiscreteScheduler``
(``timestep_spacing="linspace"``), whose timesteps list every model call: t_0, t_1, t_1, ..., t_n-1, t_n-1
(2n - 1 calls for n steps). ``use_karras_sigmas`` gives "Heun Karras". Deterministic.
"""

from __future__ import annotations

import numpy as np

from ldm.samplers.base import SigmaSampler, lincomb


class HeunSampler(SigmaSampler):
    """Heun on the sigma grid of :func:`~ldm.samplers.base.euler_schedule`."""

    name = "heun"

    def timesteps(self, num_steps: int) -> np.ndarray:
        steps = super().timesteps(num_steps)
        return np.concatenate([steps[:1], np.repeat(steps[1:], 2)])

    def step(self, denoise, x: np.ndarray, i: int, timesteps, sigmas, generator) -> np.ndarray:
        x0 = denoise(x, sigmas[i], timesteps[i])
        k = (sigmas[i + 1] - sigmas[i]) / sigmas[i]  # dt / sigma_i
        x_euler = lincomb((1.0 + k, -k), (x, x0))
        if sigmas[i + 1] == 0:
            return x_euler
        x0_end = denoise(x_euler, sigmas[i + 1], timesteps[i + 1])
        k_end = (sigmas[i + 1] - sigmas[i]) / sigmas[i + 1]  # dt / sigma_i+1
        return lincomb((1.0 + k / 2, -k / 2, k_end / 2, -k_end / 2), (x, x0, x_euler, x0_end))
