"""DDIM (Song et al., 2021), deterministic at eta = 0, DDPM-like ancestral noise at eta = 1.

Timesteps follow diffusers' ``DDIMScheduler`` with the Stable Diffusion config (``timestep_spacing="leading"``,
``steps_offset=1``, ``set_alpha_to_one=False``, ``clip_sample=False``): ``t_i = (n-1-i) * (T // n) + 1``, each step
goes to ``t - T // n`` and the last one (from t = 1) lands on alpha_bar[0], not 1. That is also the original LDM /
Stability / mindone ``make_ddim_timesteps("uniform")`` grid when ``T % n == 0``; when it is not (e.g. n = 30), LDM
takes ``len(range(0, T, T // n))`` steps (31 for n = 30) where we, like diffusers, take exactly n.
"""

from __future__ import annotations

from typing import Any, Callable

import mindspore as ms
import numpy as np

from ldm.samplers.base import (
    ModelFn,
    Sampler,
    check_start_step,
    draw_noise,
    leading_timesteps,
    lincomb,
    noise_source,
    to_host,
    x0_eps_coeffs,
)


def ddim_step_coeffs(a_t: float, a_prev: float, prediction_type: str, std: float = 0.0) -> tuple[float, float]:
    """Coefficients (c_x, c_out) of ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps`` (noise excluded).

    ``a_t``/``a_prev`` are alpha_bar at the current and the target timestep; x0 and eps come from the model output
    at ``x`` as in :func:`~ldm.samplers.base.x0_eps_coeffs`.
    """
    (x0_x, x0_o), (eps_x, eps_o) = x0_eps_coeffs(np.sqrt(a_t), np.sqrt(1.0 - a_t), prediction_type)
    s, d = np.sqrt(a_prev), np.sqrt(1.0 - a_prev - std * std)
    return float(s * x0_x + d * eps_x), float(s * x0_o + d * eps_o)


def ddim_sigma(a_t: float, a_prev: float, eta: float) -> float:
    """Std of the injected noise: ``eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` (DDIM eq. 16)."""
    return float(eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)))


class DDIMSampler(Sampler):
    """DDIM with ``eta``; one model call per step."""

    name = "ddim"
    stochastic = True  # with eta > 0

    def __init__(self, prediction_type: str = "eps", alphas_cumprod: np.ndarray | None = None, steps_offset: int = 1):
        super().__init__(prediction_type, alphas_cumprod)
        self.steps_offset = steps_offset

    def timesteps(self, num_steps: int) -> np.ndarray:
        return leading_timesteps(num_steps, self.num_train_timesteps, self.steps_offset)

    def prev_alpha(self, t: int, num_steps: int) -> float:
        """alpha_bar of the step's target ``t - T // n``; alpha_bar[0] past the start (``set_alpha_to_one=False``)."""
        prev = t - self.num_train_timesteps // num_steps
        return float(self.alphas_cumprod[max(prev, 0)])

    def start_scales(self, num_steps: int, start_step: int) -> tuple[float, float]:
        check_start_step(start_step, num_steps)
        a = float(self.alphas_cumprod[self.timesteps(num_steps)[start_step]])
        return float(np.sqrt(a)), float(np.sqrt(1.0 - a))

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 50,
        callback: Callable[[int, int, ms.Tensor], None] | None = None,
        eta: float = 0.0,
        generator: Any = None,
        start_step: int = 0,
    ) -> ms.Tensor:
        """DDIM sampling. With ``eta > 0`` each step adds ``std * z``, ``z = generator.standard_normal(x.shape)``
        (float32, drawn once per step in step order); ``generator`` may be a seed (see
        :func:`~ldm.samplers.base.noise_source`). ``None`` draws fresh entropy. ``start_step`` k runs steps k.. only
        (img2img, see :meth:`start_scales`)."""
        check_start_step(start_step, num_steps)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta > 0:
            generator = noise_source(generator)
        x = to_host(x_T)
        for i, t in enumerate(self.timesteps(num_steps)):
            if i < start_step:
                continue
            out = self._call(model_fn, x, t, cond)
            a_t, a_prev = float(self.alphas_cumprod[t]), self.prev_alpha(int(t), num_steps)
            std = ddim_sigma(a_t, a_prev, eta) if eta > 0 else 0.0
            x = lincomb(ddim_step_coeffs(a_t, a_prev, self.prediction_type, std), (x, out))
            if eta > 0:
                x = x + draw_noise(generator, x) * x.dtype.type(std)
            if callback is not None:
                callback(i, int(t), ms.Tensor(x))
        return ms.Tensor(x)
