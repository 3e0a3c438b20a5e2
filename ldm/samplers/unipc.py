"""UniPC (Zhao et al., 2023): multistep predictor (UniP) + corrector (UniC), data prediction, B(h) = expm1(-h) ("bh2").

Each step ``i`` first corrects the latent just reached, using the model output already evaluated there (so the
corrector costs no extra call), then predicts the next one:

    UniC:  x_i  <- x_i-1 -> x_i step redone with the new x0 prediction m_i added to the finite differences
    UniP:  x_i+1 = (sigma_t / sigma_s) x_i - alpha_t expm1(-h) m_i - alpha_t B(h) sum_k rho_k (m_k - m_i) / r_k

with ``r_k = (lambda_k - lambda_i) / h`` and the rho solving the order conditions ``R rho = b`` (fixed 1/2 for a
second-order predictor and a first-order corrector). No corrector follows the final step.

Defaults follow diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``, ``solver_type="bh2"``, order 2,
"linspace" timesteps, ``lower_order_final=True`` — order ``min(order, steps left)`` at any n —, ``final_sigmas_type
="zero"``). A first-order step is forced when the target sigma is 0 (diffusers returns NaN there with
``lower_order_final=False``). mindone's UniPC (wl-zhao port) uses order 3, continuous time-uniform timesteps and
ends at sigma(t=0) (``final_sigmas_type="sigma_min"``); see :mod:`ldm.samplers.dpm_solver` for the same contrast.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mindspore as ms
import numpy as np

from ldm.samplers.base import (
    ModelFn,
    MultistepSigmaSampler,
    alpha_sigma,
    check_start_step,
    lincomb,
    log_snr,
    to_host,
    x0_eps_coeffs,
    zero_length_step,
)

SOLVER_TYPES = ("bh2", "bh1")  # the first is the default


def unipc_orders(
    num_steps: int, order: int, lower_order_final: bool, sigmas: np.ndarray, start_step: int = 0
) -> list[int]:
    """Predictor order of each step: warm-up ``min(order, i - start_step + 1)``, ``min(order, n - i)`` with
    lower_order_final; the steps before ``start_step`` are not run."""
    orders = []
    for i in range(num_steps):
        o = max(1, min(order, i - start_step + 1))
        if lower_order_final:
            o = min(o, num_steps - i)
        orders.append(1 if sigmas[i + 1] == 0 else o)
    return orders


def unipc_coeffs(
    sigma_t: float, sigmas_prev: Sequence[float], order: int, corrector: bool, solver_type: str = "bh2"
) -> tuple[float, np.ndarray]:
    """Coefficients of a UniP (``corrector=False``) or UniC step from ``sigmas_prev[0]`` to ``sigma_t``.

    ``sigmas_prev`` = (s0, s1, ...) newest first, the noise levels of the stored x0 predictions m0, m1, ...; the
    start latent sits at s0. Returns ``(c_x, c_m)`` for ``x_t = c_x x + sum_k c_m[k] M[k]`` where ``M = (m0, m1, ...,
    m_{order-1})`` for the predictor and ``M = (m_t, m0, ..., m_{order-1})`` for the corrector (m_t: the x0
    prediction at the predicted x_t, which the corrector refines). A zero-length step leaves x unchanged.
    """
    if zero_length_step(sigma_t, sigmas_prev[0]):
        return 1.0, np.zeros(order + 1 if corrector else order)
    alpha_t, sig_t = alpha_sigma(sigma_t)
    _, sig_s0 = alpha_sigma(sigmas_prev[0])
    lam_s0 = log_snr(sigmas_prev[0])
    h = log_snr(sigma_t) - lam_s0
    hh = -h
    h_phi_1 = float(np.expm1(hh))
    c_x = sig_t / sig_s0
    e = np.eye(order + 1 if corrector else order)  # the x0 predictions in M as unit vectors
    m0 = e[1] if corrector else e[0]
    hist = e[1:] if corrector else e
    c_m = -alpha_t * h_phi_1 * m0
    if order == 1 and not corrector:
        return c_x, c_m
    if solver_type == "bh1":
        b_h = hh
    elif solver_type == "bh2":
        b_h = h_phi_1
    else:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    rks = np.array([(log_snr(s) - lam_s0) / h for s in sigmas_prev[1:order]] + [1.0])
    d1s = [(hist[k] - m0) / rks[k - 1] for k in range(1, order)]
    # Order conditions: R[i] = rks**i, b[i] = i! * h phi_{i+1}(hh) / B(h), with h phi_k built recursively.
    rmat, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1.0
    for i in range(1, order + 1):
        rmat.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    rmat, b = np.array(rmat), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rmat, b)
        res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), np.zeros_like(m0)) + rhos[-1] * (e[0] - m0)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rmat[:-1, :-1], b[:-1])
        res = sum((rho * d for rho, d in zip(rhos, d1s)), np.zeros_like(m0))
    return c_x, c_m - alpha_t * b_h * res


class UniPCSampler(MultistepSigmaSampler):
    """Multistep UniPC in data-prediction (x0) form, orders 1-3, B(h) variant bh2 (default) or bh1."""

    name = "unipc"

    solver_types = SOLVER_TYPES

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 20,
        callback: Callable[[int, int, ms.Tensor], None] | None = None,
        start_step: int = 0,
    ) -> ms.Tensor:
        check_start_step(start_step, num_steps)
        timesteps, sigmas = self.schedule(num_steps)
        orders = unipc_orders(num_steps, self.order, self.lower_order_final, sigmas, start_step)
        x, x_last, x0s = to_host(x_T), None, []  # x_last: corrected latent the previous predictor started from
        for i, t in enumerate(timesteps):
            if i < start_step:
                continue
            out = self._call(model_fn, x, t, cond)
            (c_x, c_out), _ = x0_eps_coeffs(*alpha_sigma(sigmas[i]), self.prediction_type)
            m = lincomb((c_x, c_out), (x, out))
            if i > start_step:
                o = orders[i - 1]
                c_x, c_m = unipc_coeffs(sigmas[i], sigmas[i - 1 :: -1], o, True, self.solver_type)
                x = lincomb([c_x, *c_m], [x_last, m, *x0s[::-1][:o]])
            x0s = (x0s + [m])[-self.order :]
            x_last = x
            c_x, c_m = unipc_coeffs(sigmas[i + 1], sigmas[i::-1], orders[i], False, self.solver_type)
            x = lincomb([c_x, *c_m], [x, *x0s[::-1][: orders[i]]])
            if callback is not None:
                callback(i, int(t), ms.Tensor(x))
        return ms.Tensor(x)
