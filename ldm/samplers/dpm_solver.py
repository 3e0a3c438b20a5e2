"""Multistep DPM-Solver++ (Lu et al., 2022), the data-prediction form, orders 1-3.

Each step integrates the diffusion ODE in log-SNR ``lambda = log(alpha_t / sigma_t)`` from noise level sigma_s to
sigma_t with the x0 predictions of the last ``order`` steps (D0, D1, D2 finite differences in lambda):

    x_t = (sigma_t / sigma_s) x - alpha_t phi1 D0 [+ 2nd/3rd order terms],   phi1 = expm1(-h), h = lambda_t - lambda_s

Defaults follow diffusers' ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, ``solver_type="midpoint"``):

* timesteps: "linspace" (``linspace(0, 999, n+1)`` rounded, descending, last dropped: 999, 949, ..., 50 for n = 20),
  or Karras sigmas (rho = 7) between sigma(t=0) and sigma(t=999), the model being called at the rounded timestep;
* ``final_sigmas_type="zero"``: the last step lands on sigma = 0 and is always first order (it returns the last x0
  prediction); ``"sigma_min"`` stops at sigma(t=0) instead;
* ``lower_order_final=True``: when n < 15 the last step is first order and the one before at most second order.
  The first steps are lower order anyway (warm-up: order min(order, i + 1)).

mindone's default DPM-Solver++ sampler (a port of LuChengTHU's ``DPM_Solver.sample``: ``skip_type="time_uniform"``,
``method="multistep"``, order 2, ``lower_order_final=True``) differs in three ways:

* time grid: uniform in continuous time t in [1/N, 1], so the model sees fractional timesteps
  ``999 - k * 999 / n`` (999, 949.05, ...) and lambda is interpolated piecewise-linearly in log-alpha; we (like
  diffusers) call the model at integer timesteps, the ones it was trained on;
* end point: t = 1/N, i.e. sigma(t=0) — our ``final_sigmas_type="sigma_min"``; diffusers' default is "zero";
* ``lower_order_final`` only applies when n < 10 there (n < 15 in diffusers), and its final step is not forced to
  first order.

We follow diffusers (``final_sigmas_type="zero"``, n < 15 rule, "linspace") so results can be checked against it
step by step; ``final_sigmas_type="sigma_min"`` gets mindone's end point. With "zero" the final step discards any
noise left at sigma(t=0), the residual-noise issue of diffusers #5689.

``algorithm_type="sde-dpmsolver++"`` is diffusers' SDE variant ("DPM++ 2M SDE" at order 2, "DPM++ 2M SDE Karras"
with Karras sigmas): the same finite differences, with the step of the reverse SDE instead of the ODE,

    x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) D0 [+ 2nd/3rd order terms] + sigma_t sqrt(1 - e^-2h) z

and ``z ~ N(0, I)`` drawn from the caller's generator once per step (the last included), as diffusers draws it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mindspore as ms
import numpy as np

from ldm.names import DPM_ALGORITHM_TYPES
from ldm.samplers.base import (
    ModelFn,
    MultistepSigmaSampler,
    alpha_sigma,
    check_start_step,
    draw_noise,
    lincomb,
    log_snr,
    noise_source,
    to_host,
    x0_eps_coeffs,
    zero_length_step,
)

SOLVER_TYPES = ("midpoint", "heun")  # the first is the default


def dpm_solver_orders(
    num_steps: int, order: int, lower_order_final: bool, final_sigma_zero: bool, start_step: int = 0
) -> list[int]:
    """Order of each step: warm-up ``min(order, i - start_step + 1)``, then diffusers' final-step rules (see module
    docstring); the steps before ``start_step`` are not run (their entries are meaningless)."""
    orders = []
    for i in range(num_steps):
        o = max(1, min(order, i - start_step + 1))
        last_lower = lower_order_final and num_steps < 15
        if i == num_steps - 1 and (last_lower or final_sigma_zero):
            o = 1
        elif i == num_steps - 2 and last_lower:
            o = min(o, 2)
        orders.append(o)
    return orders


def _step_geometry(sigma_t: float, sigmas_prev: Sequence[float], order: int):
    """(alpha_t, sigma_t, sigma_s0 in VP terms, the log-SNRs of the stored predictions, h = lambda_t - lambda_s0)."""
    alpha_t, sig_t = alpha_sigma(sigma_t)
    _, sig_s0 = alpha_sigma(sigmas_prev[0])
    lams = [log_snr(s) for s in sigmas_prev[:order]]
    return alpha_t, sig_t, sig_s0, lams, log_snr(sigma_t) - lams[0]


def _differences(lams: Sequence[float], h: float, order: int):
    """``(e, D1, D2)``: the stored x0 predictions m0, m1, m2 as unit vectors ``e`` and their finite differences in
    lambda as coefficient vectors over them; D1 from m0, m1 at order 2 (D2 None), extrapolated with m2 at order 3."""
    if order not in (2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    e = np.eye(order)
    r0 = (lams[0] - lams[1]) / h
    d1_0 = (e[0] - e[1]) / r0
    if order == 2:
        return e, d1_0, None
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (e[1] - e[2]) / r1
    return e, d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def _check_solver_type(solver_type: str) -> None:
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")


def dpm_solver_pp_coeffs(sigma_t: float, sigmas_prev: Sequence[float], order: int, solver_type: str = "midpoint"):
    """Coefficients of one multistep DPM-Solver++ step ``x_t = c_x x + sum_k c_m[k] m_k``.

    ``sigmas_prev`` are the noise levels s0, s1, s2 (newest first) of the stored x0 predictions m0, m1, m2; x sits at
    s0. Returns ``(c_x, c_m)`` with ``len(c_m) == order``. ``sigma_t`` may be 0 for a first-order step. A
    zero-length step (Karras sigmas end at sigma_min, so "sigma_min" repeats it) leaves x unchanged; diffusers
    gets the same at orders 1-2 and NaN at order 3 (0/0 in phi_2).
    """
    _check_solver_type(solver_type)
    if zero_length_step(sigma_t, sigmas_prev[0]):
        return 1.0, np.zeros(order)
    alpha_t, sig_t, sig_s0, lams, h = _step_geometry(sigma_t, sigmas_prev, order)
    phi1 = float(np.expm1(-h))
    c_x = sig_t / sig_s0
    if order == 1:
        return c_x, np.array([-alpha_t * phi1])
    e, d1, d2 = _differences(lams, h, order)
    phi2 = phi1 / h + 1.0
    c_m = -alpha_t * phi1 * e[0]
    if order == 3:
        return c_x, c_m + alpha_t * phi2 * d1 - alpha_t * (phi2 / h - 0.5) * d2
    return c_x, c_m + (-0.5 * alpha_t * phi1 if solver_type == "midpoint" else alpha_t * phi2) * d1


def sde_dpm_solver_pp_coeffs(
    sigma_t: float, sigmas_prev: Sequence[float], order: int, solver_type: str = "midpoint"
) -> tuple[float, np.ndarray, float]:
    """Coefficients of one SDE DPM-Solver++ step ``x_t = c_x x + sum_k c_m[k] m_k + c_z z`` (names as in
    :func:`dpm_solver_pp_coeffs`; ``z`` the step's standard-normal draw). A zero-length step leaves x unchanged."""
    _check_solver_type(solver_type)
    if zero_length_step(sigma_t, sigmas_prev[0]):
        return 1.0, np.zeros(order), 0.0
    alpha_t, sig_t, sig_s0, lams, h = _step_geometry(sigma_t, sigmas_prev, order)
    decay = float(np.exp(-h))  # 0 at sigma_t = 0 (h = inf)
    one_minus = float(-np.expm1(-2.0 * h))  # 1 - e^-2h
    c_x, c_z = sig_t / sig_s0 * decay, sig_t * float(np.sqrt(one_minus))
    if order == 1:
        return c_x, np.array([alpha_t * one_minus]), c_z
    e, d1, d2 = _differences(lams, h, order)
    phi2 = one_minus / (-2.0 * h) + 1.0
    c_m = alpha_t * one_minus * e[0]
    if order == 3:
        phi3 = (one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5
        return c_x, c_m + alpha_t * phi2 * d1 + alpha_t * phi3 * d2, c_z
    return c_x, c_m + (0.5 * alpha_t * one_minus if solver_type == "midpoint" else alpha_t * phi2) * d1, c_z


class DPMSolverPPSampler(MultistepSigmaSampler):
    """Multistep DPM-Solver++ ("DPM++ 2M" at order 2, "DPM++ 2M Karras" with ``use_karras_sigmas``; "DPM++ 2M SDE"
    with ``algorithm_type="sde-dpmsolver++"``)."""

    name = "dpm_solver_pp"

    solver_types = SOLVER_TYPES

    def __init__(self, *args, algorithm_type: str = DPM_ALGORITHM_TYPES[0], **kwargs):
        super().__init__(*args, **kwargs)
        if algorithm_type not in DPM_ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type must be one of {DPM_ALGORITHM_TYPES}, got {algorithm_type!r}")
        self.algorithm_type = algorithm_type

    @property
    def stochastic(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def orders(self, num_steps: int, start_step: int = 0) -> list[int]:
        final_zero = self.final_sigmas_type == "zero"
        return dpm_solver_orders(num_steps, self.order, self.lower_order_final, final_zero, start_step)

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 20,
        callback: Callable[[int, int, ms.Tensor], None] | None = None,
        generator: Any = None,
        start_step: int = 0,
    ) -> ms.Tensor:
        """Sampling; the SDE variant draws ``z`` from ``generator`` (a seed, a numpy ``Generator`` or any object with
        its ``standard_normal``; see :func:`~ldm.samplers.base.noise_source`), the ODE one ignores it.
        ``start_step`` k runs steps k.. only (img2img)."""
        check_start_step(start_step, num_steps)
        generator = noise_source(generator) if self.stochastic else None
        timesteps, sigmas = self.schedule(num_steps)
        x, x0s = to_host(x_T), []  # x0 predictions, newest last
        for i, (t, order) in enumerate(zip(timesteps, self.orders(num_steps, start_step))):
            if i < start_step:
                continue
            out = self._call(model_fn, x, t, cond)
            (c_x, c_out), _ = x0_eps_coeffs(*alpha_sigma(sigmas[i]), self.prediction_type)
            x0s = (x0s + [lincomb((c_x, c_out), (x, out))])[-self.order :]
            recent = x0s[::-1][:order]
            if generator is None:
                c_x, c_m = dpm_solver_pp_coeffs(sigmas[i + 1], sigmas[i::-1], order, self.solver_type)
                x = lincomb([c_x, *c_m], [x, *recent])
            else:
                c_x, c_m, c_z = sde_dpm_solver_pp_coeffs(sigmas[i + 1], sigmas[i::-1], order, self.solver_type)
                x = lincomb([c_x, *c_m, c_z], [x, *recent, draw_noise(generator, x)])
            if callback is not None:
                callback(i, int(t), ms.Tensor(x))
        return ms.Tensor(x)
