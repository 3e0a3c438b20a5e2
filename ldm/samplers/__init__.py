"""Samplers for Stable Diffusion latents: one interface (:mod:`ldm.samplers.base`), one module per solver.

>>> sampler = get_sampler("dpm_solver_pp", prediction_type="v")          # SD 2.x-v
>>> unet_fn = ms.jit(lambda x, t, ctx: unet(x, t, ctx))                 # compiled once, called every step
>>> x0 = sampler.sample(guided_model_fn(unet_fn, 7.5), x_T, (uncond_ctx, ctx), num_steps=20)
"""

from __future__ import annotations

from ldm.names import SAMPLER_NAMES
from ldm.samplers.base import Sampler, default_alphas_cumprod, guided_model_fn
from ldm.samplers.ddim import DDIMSampler
from ldm.samplers.dpm_solver import DPMSolverPPSampler
from ldm.samplers.euler import EulerSampler
from ldm.samplers.euler_ancestral import EulerAncestralSampler
from ldm.samplers.heun import HeunSampler
from ldm.samplers.plms import PLMSSampler
from ldm.samplers.unipc import UniPCSampler

_SOLVERS = (
    DDIMSampler,
    PLMSSampler,
    DPMSolverPPSampler,
    UniPCSampler,
    EulerSampler,
    EulerAncestralSampler,
    HeunSampler,
)
_BY_NAME = {cls.name: cls for cls in _SOLVERS}
SAMPLERS: dict[str, type[Sampler]] = {name: _BY_NAME[name] for name in SAMPLER_NAMES}  # ldm.names lists them


def get_sampler(name: str, **kwargs) -> Sampler:
    """Build the sampler registered as ``name`` (one of :data:`ldm.names.SAMPLER_NAMES`) with its options."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name](**kwargs)


__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DPMSolverPPSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "PLMSSampler",
    "Sampler",
    "UniPCSampler",
    "default_alphas_cumprod",
    "get_sampler",
    "guided_model_fn",
]
