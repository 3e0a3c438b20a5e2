"""Euler (Karras et al., 2022, Algorithm 2 without churn): one model call per step, first order.

Each step moves along the probability-flow ODE ``dx/dsigma = (x - x0) / sigma`` from sigma_i to sigma_i+1:

    x <- x + (sigma_i+1 - sigma_i) (x - x0) / sigma_i = (sigma_i+1 / sigma_i) x + (1 - sigma_i+1 / sigma_i) x0

Settings follow diffusers' ``EulerDiscreteScheduler`` as loaded for SD (``timestep_spacing="linspace"``,
``interpolation_type="linear"``, ``s_churn=0``, ``final_sigmas_type="zero"``), "Euler" in the WebUI;
``use_karras_sigmas`` gives "Euler Karras". Deterministic.
"""

from __future__ import annotations

from typing import Any, Callable

import mindspore as ms

from ldm.samplers.base import ModelFn, SigmaSampler, lincomb


class EulerSampler(SigmaSampler):
    """Euler on the sigma grid of :func:`~ldm.samplers.base.euler_schedule`."""

    name = "euler"

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 20,
        callback: Callable[[int, float, ms.Tensor], None] | None = None,
    ) -> ms.Tensor:
        timesteps, sigmas = self.schedule(num_steps)
        x = self.initial_state(x_T, sigmas)
        for i, t in enumerate(timesteps):
            x0 = self.denoised(model_fn, x, sigmas[i], t, cond)
            ratio = sigmas[i + 1] / sigmas[i]
            x = lincomb((ratio, 1.0 - ratio), (x, x0))
            if callback is not None:
                callback(i, float(t), ms.Tensor(x))
        return ms.Tensor(x)
