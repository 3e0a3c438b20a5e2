"""PLMS: pseudo linear multistep (Liu et al., 2022, "PNDM"), in diffusers' ``PNDMScheduler(skip_prk_steps=True)`` form.

Timesteps are DDIM's (``leading``, ``steps_offset=1``, ``set_alpha_to_one=False``). The update is the DDIM eta = 0
step ``x_t -> x_{t - T//n}`` driven by an Adams-Bashforth combination of the model outputs of the last 1..4 steps
(coefficients 1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24).

Warm-up: the first step is a pseudo improved Euler (Heun) step. It takes a DDIM step with e_0 = f(x_T, t_0), calls
the model again at the result (t_1), and redoes the step from x_T with (e_0 + e_1') / 2; e_1' is not kept, so the
second step is AB2 over (e_0, e_1). n steps therefore cost n + 1 model calls (n > 1) and :meth:`timesteps` lists
``t_0, t_1, t_1, t_2, ...``, exactly as diffusers' ``PNDMScheduler.timesteps``.

Versus the original LDM ``PLMSSampler`` (CompVis/Stability/mindone): same warm-up and AB coefficients and the same
final alpha_bar[0]; LDM asserts an eps model (no v-prediction) and uses its ``make_ddim_timesteps`` grid, which has
more than n steps when ``T % n != 0`` (see :mod:`ldm.samplers.ddim`). For v models we follow diffusers: the raw
v outputs are combined and the combination is converted to eps with the current step's x and alpha_bar.
"""

from __future__ import annotations

from typing import Any, Callable

import mindspore as ms
import numpy as np

from ldm.samplers.base import ModelFn, Sampler, leading_timesteps, lincomb, to_host
from ldm.samplers.ddim import ddim_step_coeffs

# Adams-Bashforth weights, newest output first, by the number of outputs available.
AB_COEFFS = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


class PLMSSampler(Sampler):
    """Fourth-order pseudo linear multistep with a Heun warm-up step."""

    name = "plms"

    def __init__(self, prediction_type: str = "eps", alphas_cumprod: np.ndarray | None = None, steps_offset: int = 1):
        super().__init__(prediction_type, alphas_cumprod)
        self.steps_offset = steps_offset

    def _grid(self, num_steps: int) -> np.ndarray:
        return leading_timesteps(num_steps, self.num_train_timesteps, self.steps_offset)

    def timesteps(self, num_steps: int) -> np.ndarray:
        ts = self._grid(num_steps)
        return ts if num_steps == 1 else np.insert(ts, 1, ts[1])

    def _step(self, x: np.ndarray, out: np.ndarray, t: int, ratio: int) -> np.ndarray:
        a_t, a_prev = float(self.alphas_cumprod[t]), float(self.alphas_cumprod[max(t - ratio, 0)])
        return lincomb(ddim_step_coeffs(a_t, a_prev, self.prediction_type), (x, out))

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 50,
        callback: Callable[[int, int, ms.Tensor], None] | None = None,
    ) -> ms.Tensor:
        ratio = self.num_train_timesteps // num_steps
        x, history = to_host(x_T), []
        for i, t in enumerate(self._grid(num_steps)):
            t = int(t)
            out = self._call(model_fn, x, t, cond)
            history = (history + [out])[-4:]
            if i == 0 and num_steps > 1:
                x_next = self._step(x, out, t, ratio)
                out_next = self._call(model_fn, x_next, t - ratio, cond)
                combined = lincomb((0.5, 0.5), (out, out_next))
            else:
                combined = lincomb(AB_COEFFS[len(history)], history[::-1])
            x = self._step(x, combined, t, ratio)
            if callback is not None:
                callback(i, t, ms.Tensor(x))
        return ms.Tensor(x)
