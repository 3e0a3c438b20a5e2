"""The sampler interface shared by every solver, plus the small pure functions they are built from.

Interface
    ``model_fn(x, t, cond) -> eps or v``: ``x`` is a MindSpore latent tensor ``[B, ...]``, ``t`` an int32 tensor
    ``[B]`` of DDPM timesteps (0..T-1, SD: T = 1000; float32 and fractional for the sigma samplers below), ``cond``
    is passed through untouched. The call
    may be (and for a UNet should be) a graph-compiled function, e.g. ``ms.jit(unet)``: samplers call it with the
    same shapes and dtypes at every step, so it compiles once.

    ``Sampler(prediction_type, alphas_cumprod, **solver_options).sample(model_fn, x_T, cond, num_steps) -> x_0``.
    ``prediction_type`` is ``"eps"`` or ``"v"``; ``alphas_cumprod`` defaults to SD's scaled-linear schedule
    (0.00085..0.012, 1000 steps, :mod:`ldm.schedule`). ``Sampler.timesteps(num_steps)`` returns the timesteps the
    model is called at, in call order.

    img2img: the samplers of ``ldm.names.IMG2IMG_SAMPLER_NAMES`` also take ``sample(..., start_step=k)``: they run
    steps k..n-1 of the n-step schedule from a latent noised to the level of step k, ``alpha * x0 + sigma * noise``
    with ``(alpha, sigma) = start_scales(n, k)`` (diffusers' img2img: ``set_begin_index(k)`` and ``add_noise``).
    Multistep solvers warm up again from step k, as diffusers' do.

Numerics
    Every step is a linear combination of arrays (the latent and stored model outputs or x0 predictions) whose
    scalar coefficients are computed in float64 numpy/Python; the combination itself runs in the latent's dtype.
    The solver state lives on the host as numpy arrays: a latent is small (16K floats for a 512px image), so each
    step costs one copy in and one out of the model call, where MindSpore ops would each pay an op launch (tens of
    microseconds on CPU; measured in ``benchmarks/profile_sample.py``). The random draws (DDIM with eta > 0, Euler
    ancestral, SDE DPM-Solver++) come from a ``generator`` the caller passes: a numpy ``Generator`` or a seed, or any
    object with numpy's ``standard_normal(shape, dtype=)`` (a test wraps a torch generator so diffusers draws the same
    noise), so a seed fixes the result on every device. ``Sampler.stochastic`` says whether a sampler draws.

Sigma samplers
    The Euler family (:class:`SigmaSampler`) integrates in the variance-exploding form ``x = x_vp / alpha_t`` as
    diffusers' Euler/Heun schedulers and k-diffusion do: the state starts at ``x_T * sigma_max``, the model sees
    ``x / sqrt(sigma^2 + 1)`` and a fractional timestep (float32), and the state at sigma = 0 is x_0.

Classifier-free guidance
    :func:`guided_model_fn` wraps ``model_fn`` so one batched call per step evaluates [uncond, cond] and combines
    ``uncond + scale * (cond - uncond)`` in the model's output space (valid for eps and v alike, both linear).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mindspore as ms
import numpy as np
from mindspore import ops

from ldm.schedule import alphas_cumprod as _cumprod
from ldm.schedule import make_betas

ModelFn = Callable[[ms.Tensor, ms.Tensor, Any], ms.Tensor]
PREDICTION_TYPES = ("eps", "v")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def default_alphas_cumprod() -> np.ndarray:
    """SD's alpha_bar: scaled-linear betas 0.00085..0.012 over 1000 steps, float64."""
    return _cumprod(make_betas())


# ----------------------------------------------------------------------------------------------------------------
# Scalar helpers (float64 numpy)
# ----------------------------------------------------------------------------------------------------------------


def x0_eps_coeffs(alpha: float, sigma: float, prediction_type: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Coefficients expressing x0 and eps as ``c_x * x + c_out * model_output`` at a point ``x = alpha x0 + sigma eps``.

    Returns ``((x0_x, x0_out), (eps_x, eps_out))``. For eps models x0 = (x - sigma eps) / alpha; for v models
    (v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1) x0 = alpha x - sigma v and eps = sigma x + alpha v.
    """
    if prediction_type == "eps":
        return (1.0 / alpha, -sigma / alpha), (0.0, 1.0)
    if prediction_type == "v":
        return (alpha, -sigma), (sigma, alpha)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def leading_timesteps(num_steps: int, num_train_timesteps: int, steps_offset: int = 1) -> np.ndarray:
    """diffusers' "leading" spacing, descending: ``arange(n) * (T // n) + steps_offset`` (SD: 901, 801, ..., 1)."""
    _check_steps(num_steps, num_train_timesteps)
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps, dtype=np.int64) * ratio)[::-1] + steps_offset


def linspace_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' "linspace" spacing for multistep solvers: ``linspace(0, T-1, n+1)`` rounded, descending, without 0."""
    _check_steps(num_steps, num_train_timesteps)
    return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: ``num_steps`` sigmas uniform in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log-sigma, clamped to [0, T-1]."""
    return np.interp(np.log(np.maximum(sigma, 1e-10)), log_sigmas, np.arange(len(log_sigmas), dtype=np.float64))


def sigma_schedule(
    alphas_cumprod: np.ndarray,
    num_steps: int,
    use_karras_sigmas: bool = False,
    final_sigmas_type: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps ``[n]`` and noise levels ``sigma = sqrt((1 - a) / a)`` ``[n + 1]`` of the multistep solvers.

    Time-uniform ("linspace") timesteps, or Karras sigmas between sigma(t=0) and sigma(t=T-1) mapped back to the
    nearest integer timestep for the model call (the solver itself steps in the exact Karras sigmas). The last
    sigma is 0 (``"zero"``: denoise fully) or sigma(t=0) (``"sigma_min"``), as diffusers' ``final_sigmas_type``.
    """
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
    all_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    if use_karras_sigmas:
        _check_steps(num_steps, len(alphas_cumprod))
        sigmas = karras_sigmas(all_sigmas[0], all_sigmas[-1], num_steps)
        timesteps = sigma_to_t(sigmas, np.log(all_sigmas)).round().astype(np.int64)
    else:
        timesteps = linspace_timesteps(num_steps, len(alphas_cumprod))
        sigmas = all_sigmas[timesteps]
    last = 0.0 if final_sigmas_type == "zero" else all_sigmas[0]
    return timesteps, np.append(sigmas, last)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the VP process at noise level ``sigma = sigma_t / alpha_t``."""
    alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
    return float(alpha), float(sigma * alpha)


def log_snr(sigma: float) -> float:
    """lambda = log(alpha_t / sigma_t) = -log(sigma); +inf at sigma = 0."""
    return float(-np.log(sigma)) if sigma > 0 else float("inf")


def zero_length_step(sigma_t: float, sigma_s: float) -> bool:
    """True when a step starts and ends at the same noise level (up to float64 rounding of the Karras formula)."""
    return abs(sigma_t - sigma_s) <= 1e-9 * sigma_s


def check_start_step(start_step: int, num_steps: int) -> None:
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps - 1}] for {num_steps} steps, got {start_step}")


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")


# ----------------------------------------------------------------------------------------------------------------
# Tensor helpers (MindSpore)
# ----------------------------------------------------------------------------------------------------------------


def lincomb(coeffs: Sequence[float], arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``sum_i coeffs[i] * arrays[i]`` in the arrays' dtype, skipping zero coefficients (e.g. sigma_next = 0 on a
    final step)."""
    out = None
    for c, a in zip(coeffs, arrays):
        if c == 0.0:
            continue
        term = a * a.dtype.type(c)
        out = term if out is None else out + term
    return np.zeros_like(arrays[0]) if out is None else out


def _cat_batch(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch axis: tensors, or tuples/lists/dicts of them."""
    if isinstance(a, ms.Tensor):
        return ops.cat((a, b), axis=0)
    if isinstance(a, (tuple, list)):
        return type(a)(_cat_batch(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: _cat_batch(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def guided_model_fn(model_fn: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance with one batched model call per step.

    The returned function takes ``cond = (uncond_context, cond_context)``, calls ``model_fn`` once on the batch
    ``[x; x]`` with contexts ``[uncond; cond]`` and returns ``uncond_out + scale * (cond_out - uncond_out)``.
    At ``scale == 1`` only the conditional half is evaluated.
    """

    def guided(x: ms.Tensor, t: ms.Tensor, cond: Any) -> ms.Tensor:
        uncond, c = cond
        if scale == 1.0:
            return model_fn(x, t, c)
        out = model_fn(ops.cat((x, x), axis=0), ops.cat((t, t), axis=0), _cat_batch(uncond, c))
        out_u, out_c = ops.split(out, x.shape[0], axis=0)
        return out_u + float(scale) * (out_c - out_u)

    return guided


# ----------------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------------


class Sampler:
    """Common configuration (prediction type, schedule) and the model call of every solver."""

    name = ""
    stochastic = False  # whether sample() draws noise from its generator
    timestep_dtype = np.int32

    def __init__(self, prediction_type: str = "eps", alphas_cumprod: np.ndarray | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        ac = default_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or not np.all((ac > 0) & (ac < 1)):
            raise ValueError("alphas_cumprod must be a 1-D array with values in (0, 1)")
        self.alphas_cumprod = ac

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Timesteps the model is called at, in call order (int64)."""
        raise NotImplementedError

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 20,
        callback: Callable[[int, int, ms.Tensor], None] | None = None,
    ) -> ms.Tensor:
        """Integrate from ``x_T`` (pure noise) to x_0 latents in ``num_steps`` steps.

        ``callback(step, timestep, x)`` is called after every step with the updated latents.
        """
        raise NotImplementedError

    def start_scales(self, num_steps: int, start_step: int) -> tuple[float, float]:
        """(alpha, sigma) of the latent ``alpha * x0 + sigma * noise`` that ``sample(..., start_step=start_step)``
        starts from (img2img); a sampler that cannot start part-way raises ValueError naming itself."""
        raise ValueError(f"sampler {self.name!r} cannot start from an image (img2img)")

    def _call(self, model_fn: ModelFn, x: np.ndarray, t: float, cond: Any) -> np.ndarray:
        """The model's output at host latents ``x`` and timestep ``t``, as a host array of ``x``'s dtype."""
        ts = ms.Tensor(np.full((x.shape[0],), t, dtype=self.timestep_dtype))
        return model_fn(ms.Tensor(x), ts, cond).asnumpy().astype(x.dtype, copy=False)


def noise_source(generator: Any):
    """What a stochastic sampler draws from: ``generator`` itself when it has ``standard_normal``, else a numpy
    ``Generator`` seeded with it (``None``: fresh entropy)."""
    return generator if hasattr(generator, "standard_normal") else np.random.default_rng(generator)


def draw_noise(generator: Any, like: np.ndarray) -> np.ndarray:
    """One standard-normal draw of ``like``'s shape (float32, as diffusers draws it), in ``like``'s dtype."""
    return np.asarray(generator.standard_normal(tuple(like.shape), dtype=np.float32)).astype(like.dtype, copy=False)


def to_host(x: ms.Tensor | np.ndarray) -> np.ndarray:
    """The latents as a numpy array (samplers keep their state on the host; see "Numerics")."""
    return x.asnumpy() if isinstance(x, ms.Tensor) else np.asarray(x)


class MultistepSigmaSampler(Sampler):
    """Shared set-up of the multistep solvers on a sigma schedule (DPM-Solver++ and UniPC).

    Subclasses name their ``solver_types`` (the first is the default) and implement ``sample``.
    """

    solver_types: tuple[str, ...] = ()

    def __init__(
        self,
        prediction_type: str = "eps",
        alphas_cumprod: np.ndarray | None = None,
        order: int = 2,
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        solver_type: str | None = None,
    ):
        super().__init__(prediction_type, alphas_cumprod)
        solver_type = self.solver_types[0] if solver_type is None else solver_type
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if solver_type not in self.solver_types:
            raise ValueError(f"solver_type must be one of {self.solver_types}, got {solver_type!r}")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
        self.order = order
        self.lower_order_final = lower_order_final
        self.use_karras_sigmas = use_karras_sigmas
        self.final_sigmas_type = final_sigmas_type
        self.solver_type = solver_type

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps [n], sigmas [n + 1]); see :func:`sigma_schedule`."""
        return sigma_schedule(self.alphas_cumprod, num_steps, self.use_karras_sigmas, self.final_sigmas_type)

    def timesteps(self, num_steps: int) -> np.ndarray:
        return self.schedule(num_steps)[0]

    def start_scales(self, num_steps: int, start_step: int) -> tuple[float, float]:
        check_start_step(start_step, num_steps)
        return alpha_sigma(self.schedule(num_steps)[1][start_step])


def euler_schedule(
    alphas_cumprod: np.ndarray, num_steps: int, use_karras_sigmas: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps ``[n]`` and sigmas ``[n + 1]`` (last 0) of diffusers' Euler/Heun schedulers (``timestep_spacing=
    "linspace"``, ``interpolation_type="linear"``): ``n`` timesteps ``linspace(T-1, 0)``, sigmas interpolated
    linearly in t; or Karras sigmas between the first and last of those (sigma(t=T-1) and sigma(t=0)) at the
    fractional timesteps that interpolating log-sigma gives (diffusers does not round them here)."""
    _check_steps(num_steps, len(alphas_cumprod))
    all_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    timesteps = np.linspace(0.0, len(alphas_cumprod) - 1.0, num_steps)[::-1]
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas), dtype=np.float64), all_sigmas)
    if use_karras_sigmas:  # between the ends of the linspace grid, as diffusers (the same ends unless n = 1)
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        timesteps = sigma_to_t(sigmas, np.log(all_sigmas))
    return timesteps, np.append(sigmas, 0.0)


class SigmaSampler(Sampler):
    """Shared set-up of the Euler family: the schedule, the initial state and the model's x0 prediction at a sigma
    (see "Sigma samplers")."""

    timestep_dtype = np.float32

    def __init__(
        self, prediction_type: str = "eps", alphas_cumprod: np.ndarray | None = None, use_karras_sigmas: bool = False
    ):
        super().__init__(prediction_type, alphas_cumprod)
        self.use_karras_sigmas = use_karras_sigmas

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps [n], sigmas [n + 1]); see :func:`euler_schedule`."""
        return euler_schedule(self.alphas_cumprod, num_steps, self.use_karras_sigmas)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Timesteps of the model calls, as the model gets them (float32)."""
        return self.schedule(num_steps)[0].astype(np.float32)

    def sample(
        self,
        model_fn: ModelFn,
        x_T: ms.Tensor,
        cond: Any = None,
        num_steps: int = 20,
        callback: Callable[[int, float, ms.Tensor], None] | None = None,
        generator: Any = None,
    ) -> ms.Tensor:
        """Integrate from ``x_T * sigma_max`` to sigma = 0 with :meth:`step`; a stochastic sampler draws from
        ``generator`` (see :func:`noise_source`), the others ignore it."""
        generator = noise_source(generator) if self.stochastic else None
        timesteps, sigmas = self.schedule(num_steps)
        x = to_host(x_T)
        x = x * x.dtype.type(sigmas.max())  # diffusers' init_noise_sigma for "linspace" spacing

        def denoise(x_, sigma, t):
            return self.denoised(model_fn, x_, sigma, t, cond)

        for i, t in enumerate(timesteps):
            x = self.step(denoise, x, i, timesteps, sigmas, generator)
            if callback is not None:
                callback(i, float(t), ms.Tensor(x))
        return ms.Tensor(x)

    def step(self, denoise, x: np.ndarray, i: int, timesteps, sigmas, generator) -> np.ndarray:
        """Step ``i``: from ``sigmas[i]`` to ``sigmas[i + 1]``; ``denoise(x, sigma, t)`` is the model's x0."""
        raise NotImplementedError

    def denoised(self, model_fn: ModelFn, x: np.ndarray, sigma: float, t: float, cond: Any) -> np.ndarray:
        """The model's x0 prediction at state ``x`` and noise level ``sigma``, called at timestep ``t`` on the
        VP-scaled input ``alpha x`` with ``alpha = 1 / sqrt(sigma^2 + 1)``."""
        alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
        out = self._call(model_fn, x * x.dtype.type(alpha), t, cond)
        (c_x, c_out), _ = x0_eps_coeffs(alpha, sigma * alpha, self.prediction_type)
        return lincomb((c_x * alpha, c_out), (x, out))
