"""Sampler parity with diffusers' schedulers, classifier-free guidance batching, determinism and graph-mode use.

Parity: the same deterministic toy "network" ``out = tanh(A * x + B * t / 1000)`` is written twice (MindSpore for
our samplers, torch for the diffusers loop, which runs as diffusers' pipelines run it: ``x_T * init_noise_sigma``,
``scale_model_input`` before every call) and read as eps or as v; both start from the same x_T. The stochastic
samplers get the same noise: DDIM with eta > 0 from the seeded numpy generator, passed to diffusers as
``variance_noise``; Euler ancestral and SDE DPM-Solver++ from one torch generator seed, handed to diffusers as its
``generator`` and to ours wrapped in numpy's ``standard_normal`` (:class:`TorchNoise`), drawn in the same order.
We compare the model-call timesteps exactly (the Karras timesteps of euler/heun, fractional and computed by
diffusers from float32 sigmas, to ``TS_ATOL = 2e-3``; observed <= 1.3e-3) and the final latents with
``atol = rtol = 1e-4``, except SDE DPM-Solver++ read as eps (below).

Why 1e-4: diffusers builds betas, alpha_bar and its sigmas in float32 (alpha_bar[999] ~ 4.7e-3 carries a relative
error of ~1e-6 from the float32 cumprod) and evaluates every coefficient in float32, while we compute coefficients
in float64. The toy is a poor denoiser, so read as eps its x0 predictions (x - sigma eps) / alpha reach |x| ~ 40
and the float32 coefficient error is amplified by up to 1 / sqrt(alpha_bar) ~ 15: observed max differences are
<= 7.3e-4 on |x| <= 45 for eps (~2e-5 relative) and <= 8e-6 on |x| <= 2.7 for v (print them with ``-s``).
The SDE step adds ``sigma_t sqrt(1 - e^-2h) z`` to every element with float32 coefficients, so there the error
follows the latents' overall size rather than each element's: observed max differences are <= 1.7e-5 * max |x|
(7.3e-4 on |x| <= 43), which one element of 512 exceeds ``atol + rtol * |x|`` by, so those cases compare with
``atol = SDE_REL * max |x|``, ``SDE_REL = 3e-5``. Changing a solver option (order 2 -> 3, midpoint -> heun, zero
-> sigma_min final sigma) moves the result by 5e-3..2e-1, and another noise seed by far more, far outside either.
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from mindspore import ops

from ldm.samplers import SAMPLERS, DDIMSampler, get_sampler, guided_model_fn
from ldm.samplers.dpm_solver import dpm_solver_orders

A, B = 0.8, 1.3
SHAPE = (2, 4, 8, 8)
ATOL = RTOL = 1e-4
TS_ATOL = 2e-3  # fractional Karras timesteps of the sigma samplers (see the module docstring)
SDE_REL = 3e-5  # SDE DPM-Solver++ read as eps: atol = SDE_REL * max |x| (see the module docstring)
NOISE_SEED = 5
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction"}


def ms_toy(x, t, cond):
    h = A * x + B * t.astype(ms.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
    if cond is not None:
        h = h + cond.mean(axis=-1).reshape((-1,) + (1,) * (x.ndim - 1))
    return ops.tanh(h)


def torch_toy(x, t):
    return torch.tanh(A * x + B * float(t) / 1000.0)


def x_T(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


class TorchNoise:
    """A torch generator behind numpy's ``standard_normal``: what our stochastic samplers draw from, so they get the
    noise diffusers draws from ``torch.Generator().manual_seed(seed)``."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape, dtype=np.float32):
        assert dtype == np.float32
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy()


# ---- diffusers reference configurations (SD settings written out, not taken from defaults) -------------------------


def ref_scheduler(name, pred, **opts):
    p = DIFFUSERS_PRED[pred]
    if name == "ddim":
        return DDIMScheduler(
            **SD, prediction_type=p, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
            timestep_spacing="leading",
        )  # fmt: skip
    if name == "plms":
        return PNDMScheduler(
            **SD, prediction_type=p, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
            timestep_spacing="leading",
        )  # fmt: skip
    if name == "dpm_solver_pp":
        return DPMSolverMultistepScheduler(
            **SD, prediction_type=p, solver_order=opts.get("order", 2),
            solver_type=opts.get("solver_type", "midpoint"), lower_order_final=opts.get("lower_order_final", True),
            algorithm_type=opts.get("algorithm_type", "dpmsolver++"),
            use_karras_sigmas=opts.get("use_karras_sigmas", False),
            final_sigmas_type=opts.get("final_sigmas_type", "zero"), timestep_spacing="linspace", steps_offset=0,
        )  # fmt: skip
    if name == "unipc":
        return UniPCMultistepScheduler(
            **SD, prediction_type=p, solver_order=opts.get("order", 2), solver_type=opts.get("solver_type", "bh2"),
            predict_x0=True, lower_order_final=True, use_karras_sigmas=opts.get("use_karras_sigmas", False),
            final_sigmas_type=opts.get("final_sigmas_type", "zero"), timestep_spacing="linspace", steps_offset=0,
        )  # fmt: skip
    karras = opts.get("use_karras_sigmas", False)
    if name == "euler":
        return EulerDiscreteScheduler(**SD, prediction_type=p, timestep_spacing="linspace", use_karras_sigmas=karras)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**SD, prediction_type=p, timestep_spacing="linspace")
    if name == "heun":
        return HeunDiscreteScheduler(**SD, prediction_type=p, timestep_spacing="linspace", use_karras_sigmas=karras)
    raise KeyError(name)


def run_reference(scheduler, x0, num_steps, eta=0.0, noises=None):
    """diffusers' denoising loop (as in its SD pipelines); stochastic schedulers draw from a seeded generator."""
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x0.copy()) * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(NOISE_SEED)
    for i, t in enumerate(scheduler.timesteps):
        kw = {}
        if eta > 0:
            kw = dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
        elif isinstance(scheduler, EulerAncestralDiscreteScheduler) or "sde" in scheduler.config.get(
            "algorithm_type", ""
        ):
            kw = dict(generator=generator)
        x = scheduler.step(torch_toy(scheduler.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x.numpy(), scheduler.timesteps.numpy()


def run_ours(sampler, x0, num_steps, **kw):
    called = []

    def model(x, t, cond):
        called.append(float(t.asnumpy()[0]))
        return ms_toy(x, t, cond)

    if sampler.stochastic and "generator" not in kw and sampler.name != "ddim":
        kw["generator"] = TorchNoise(NOISE_SEED)
    out = sampler.sample(model, ms.Tensor(x0), None, num_steps, **kw)
    return out.asnumpy(), np.array(called)


def timestep_tolerance(name, opts):
    return TS_ATOL if name in ("euler", "heun") and opts.get("use_karras_sigmas") else 0.0


def check(ours, ref, label, ts_atol=0.0, sde=False):
    (x, ts), (x_ref, ts_ref) = ours, ref
    assert ts.shape == ts_ref.shape, f"{label}: {len(ts)} model calls, diffusers makes {len(ts_ref)}"
    np.testing.assert_allclose(ts, ts_ref, rtol=0, atol=ts_atol, err_msg=f"{label}: model-call timesteps differ")
    err = float(np.abs(x - x_ref).max())
    print(f"{label}: max |ours - diffusers| = {err:.2e} (max |x| = {np.abs(x_ref).max():.2f})")
    assert np.all(np.isfinite(x))
    atol = max(ATOL, SDE_REL * float(np.abs(x_ref).max())) if sde else ATOL
    np.testing.assert_allclose(x, x_ref, atol=atol, rtol=RTOL, err_msg=label)


# The solvers the brief asks for, at every step count ...
CORE = {
    "ddim": ("ddim", {}),
    "plms": ("plms", {}),
    "dpmpp_2m": ("dpm_solver_pp", {}),
    "dpmpp_2m_karras": ("dpm_solver_pp", {"use_karras_sigmas": True}),
    "dpmpp_3m": ("dpm_solver_pp", {"order": 3}),
    "unipc_2": ("unipc", {}),
    "unipc_3": ("unipc", {"order": 3}),
    "euler": ("euler", {}),
    "euler_karras": ("euler", {"use_karras_sigmas": True}),
    "euler_a": ("euler_a", {}),
    "heun": ("heun", {}),
    "heun_karras": ("heun", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("dpm_solver_pp", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("dpm_solver_pp", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
}
# ... and the other options, with (10) and without (20) diffusers' lower_order_final rule in effect.
OPTIONS = {
    "dpmpp_1": ("dpm_solver_pp", {"order": 1}),
    "dpmpp_2m_heun": ("dpm_solver_pp", {"solver_type": "heun"}),
    "dpmpp_2m_sigma_min": ("dpm_solver_pp", {"final_sigmas_type": "sigma_min"}),
    "dpmpp_2m_karras_sigma_min": ("dpm_solver_pp", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    "dpmpp_3m_no_lower_order_final": ("dpm_solver_pp", {"order": 3, "lower_order_final": False}),
    "unipc_3_karras": ("unipc", {"order": 3, "use_karras_sigmas": True}),
    "unipc_2_bh1_sigma_min": ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "dpmpp_sde_1": ("dpm_solver_pp", {"algorithm_type": "sde-dpmsolver++", "order": 1}),
    "dpmpp_2m_sde_heun": ("dpm_solver_pp", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmpp_3m_sde": ("dpm_solver_pp", {"algorithm_type": "sde-dpmsolver++", "order": 3}),
}
PARITY = [(c, n) for c in CORE for n in (10, 20, 25)] + [(c, n) for c in OPTIONS for n in (10, 20)]


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize(("case", "num_steps"), PARITY)
def test_parity_with_diffusers(case, num_steps, pred):
    name, opts = {**CORE, **OPTIONS}[case]
    x0 = x_T()
    ours = run_ours(get_sampler(name, prediction_type=pred, **opts), x0, num_steps)
    ref = run_reference(ref_scheduler(name, pred, **opts), x0, num_steps)
    sde = opts.get("algorithm_type") == "sde-dpmsolver++"
    check(ours, ref, f"{case} n={num_steps} {pred}", timestep_tolerance(name, opts), sde)


@pytest.mark.parametrize("case", ["euler_a", "dpmpp_2m_sde"])
def test_stochastic_samplers_follow_their_generator(case):
    """Same seed, same images (a numpy seed or Generator alike); another seed moves them; the noise is really used
    (an all-zero noise source gives another result than diffusers' draws)."""
    name, opts = CORE[case]
    sampler, x0 = get_sampler(name, **opts), ms.Tensor(x_T())
    a = sampler.sample(ms_toy, x0, None, 8, generator=7).asnumpy()
    np.testing.assert_array_equal(a, sampler.sample(ms_toy, x0, None, 8, generator=np.random.default_rng(7)).asnumpy())
    assert np.abs(a - sampler.sample(ms_toy, x0, None, 8, generator=8).asnumpy()).max() > 1e-2

    class Zeros:
        def standard_normal(self, shape, dtype):
            return np.zeros(shape, dtype)

    ref, _ = run_reference(ref_scheduler(name, "eps", **opts), x_T(), 8)
    assert np.abs(sampler.sample(ms_toy, x0, None, 8, generator=Zeros()).asnumpy() - ref).max() > 1e-2


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [10, 20, 25])
def test_ddim_eta_parity_with_injected_noise(num_steps, pred):
    eta, seed = 0.7, 123
    x0 = x_T()
    gen = np.random.default_rng(seed)
    noises = [gen.standard_normal(SHAPE, dtype=np.float32) for _ in range(num_steps)]
    ours = run_ours(DDIMSampler(pred), x0, num_steps, eta=eta, generator=seed)
    ref = run_reference(ref_scheduler("ddim", pred), x0, num_steps, eta=eta, noises=noises)
    check(ours, ref, f"ddim eta={eta} n={num_steps} {pred}")


def test_timesteps_method_matches_calls():
    for name in SAMPLERS:
        sampler = get_sampler(name)
        for n in (1, 7, 30):
            _, called = run_ours(sampler, x_T(), n)
            np.testing.assert_array_equal(sampler.timesteps(n), called.astype(np.float32), err_msg=f"{name} n={n}")


@pytest.mark.parametrize("case", list(CORE))
def test_timesteps_match_diffusers_at_other_step_counts(case):
    name, opts = CORE[case]
    for n in (1, 2, 3, 7, 30, 50, 1000):
        ref = ref_scheduler(name, "eps", **opts)
        ref.set_timesteps(n)
        ours = get_sampler(name, **opts).timesteps(n)
        atol = timestep_tolerance(name, opts)
        np.testing.assert_allclose(ours, ref.timesteps.numpy(), rtol=0, atol=atol, err_msg=f"n={n}")


def test_dpm_solver_orders():
    # diffusers rules: warm-up, then lower orders at the end only below 15 steps; a sigma=0 final step is 1st order.
    assert dpm_solver_orders(10, 3, True, True) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert dpm_solver_orders(20, 3, True, False)[-3:] == [3, 3, 3]
    assert dpm_solver_orders(20, 2, True, True)[-2:] == [2, 1]
    assert dpm_solver_orders(5, 2, False, False) == [1, 2, 2, 2, 2]


@pytest.mark.parametrize("name", ["dpm_solver_pp", "unipc"])
def test_karras_sigma_min_last_step_is_identity(name):
    """Karras sigmas end at sigma_min, so with final_sigmas_type="sigma_min" the last step has zero length: it must
    leave x unchanged (diffusers returns NaN there at order 3). UniPC still applies its corrector to the latent
    reached before it, so only the DPM-Solver++ step is checked for identity."""
    sampler = get_sampler(name, order=3, lower_order_final=False, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    seen = []
    out = sampler.sample(ms_toy, ms.Tensor(x_T()), None, 20, callback=lambda i, t, x: seen.append(x.asnumpy()))
    assert np.all(np.isfinite(out.asnumpy()))
    if name == "dpm_solver_pp":
        np.testing.assert_array_equal(seen[-1], seen[-2])


def test_guidance_one_batched_call_equals_two_calls():
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal(SHAPE).astype(np.float32))
    t = ms.Tensor(np.full((SHAPE[0],), 501, np.int32))
    uncond = ms.Tensor(rng.standard_normal((SHAPE[0], 5)).astype(np.float32))
    cond = ms.Tensor(rng.standard_normal((SHAPE[0], 5)).astype(np.float32))
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return ms_toy(x, t, c)

    scale = 7.5
    guided = guided_model_fn(model, scale)(x, t, (uncond, cond)).asnumpy()
    assert calls == [2 * SHAPE[0]]
    out_u, out_c = ms_toy(x, t, uncond).asnumpy(), ms_toy(x, t, cond).asnumpy()
    np.testing.assert_allclose(guided, out_u + scale * (out_c - out_u), atol=1e-5, rtol=1e-5)
    calls.clear()
    np.testing.assert_allclose(guided_model_fn(model, 1.0)(x, t, (uncond, cond)).asnumpy(), out_c, atol=1e-6)
    assert calls == [SHAPE[0]]


def test_guided_sampling_runs_every_sampler():
    rng = np.random.default_rng(2)
    ctx = tuple(ms.Tensor(rng.standard_normal((SHAPE[0], 3)).astype(np.float32)) for _ in range(2))
    for name in SAMPLERS:
        out = get_sampler(name).sample(guided_model_fn(ms_toy, 5.0), ms.Tensor(x_T()), ctx, 6).asnumpy()
        assert out.shape == SHAPE and np.all(np.isfinite(out)), name


def test_ddim_eta_deterministic_given_seed():
    sampler, x0 = DDIMSampler(), ms.Tensor(x_T())
    a = sampler.sample(ms_toy, x0, None, 8, eta=1.0, generator=7).asnumpy()
    b = sampler.sample(ms_toy, x0, None, 8, eta=1.0, generator=np.random.default_rng(7)).asnumpy()
    c = sampler.sample(ms_toy, x0, None, 8, eta=1.0, generator=8).asnumpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    d = sampler.sample(ms_toy, x0, None, 8).asnumpy()
    np.testing.assert_array_equal(d, sampler.sample(ms_toy, x0, None, 8).asnumpy())


@ms.jit
def jit_toy(x, t, cond):
    return ops.tanh(A * x + B * t.astype(ms.float32).reshape((-1, 1, 1, 1)) / 1000.0 + cond.reshape((-1, 1, 1, 1)))


def test_graph_compiled_model_fn(graph_mode):
    """A jit-compiled model (as a UNet would be) under GRAPH_MODE, with and without batched guidance."""
    x0 = ms.Tensor(x_T())
    zero = ms.Tensor(np.zeros((SHAPE[0], 1), np.float32))
    for name in ("ddim", "dpm_solver_pp"):
        sampler = get_sampler(name, prediction_type="v")
        ref = sampler.sample(ms_toy, x0, None, 5).asnumpy()
        np.testing.assert_allclose(sampler.sample(jit_toy, x0, zero, 5).asnumpy(), ref, atol=1e-5)
        guided = sampler.sample(guided_model_fn(jit_toy, 3.0), x0, (zero, zero), 5).asnumpy()
        np.testing.assert_allclose(guided, ref, atol=1e-5)


def test_bad_options_raise():
    with pytest.raises(
        ValueError, match=r"unknown sampler 'euler_x'; choose from ddim, plms, .*, euler, euler_a, heun"
    ):
        get_sampler("euler_x")
    with pytest.raises(ValueError, match="use_karras_sigmas does not apply to euler_a"):
        get_sampler("euler_a", use_karras_sigmas=True)
    with pytest.raises(ValueError, match="algorithm_type"):
        get_sampler("dpm_solver_pp", algorithm_type="sde-dpmsolver")
    with pytest.raises(ValueError, match="prediction_type"):
        get_sampler("ddim", prediction_type="epsilon")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        get_sampler("dpm_solver_pp", final_sigmas_type="none")
    with pytest.raises(ValueError, match="num_steps"):
        get_sampler("unipc").timesteps(0)
