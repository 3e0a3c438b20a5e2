"""Names every layer shares: model families, original-LDM key prefixes and sampler names.

Plain Python with no MindSpore import, so CLIs can validate options and files can be classified before the
framework starts. Each name is defined here once; modules import it instead of spelling it again.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("sd1", "sd2")  # sd1: CLIP ViT-L/14 text encoder; sd2: OpenCLIP ViT-H/14

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
TEXT_ROOTS = {"sd1": TEXT_PREFIX + "transformer.", "sd2": TEXT_PREFIX + "model."}

# The text-encoder class each family's model config names (its ``cond_stage_config.target``).
TEXT_ENCODER_CLASSES = {
    "sd1": "ldm.models.text_encoders.FrozenCLIPEmbedder",
    "sd2": "ldm.models.text_encoders.FrozenOpenCLIPEmbedder",
}

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")  # MindSpore's device_target values, for every CLI

SAMPLER_NAMES = ("ddim", "plms", "dpm_solver_pp", "unipc", "euler", "euler_a", "heun")
KARRAS_SAMPLERS = ("dpm_solver_pp", "unipc", "euler", "heun")  # those with a use_karras_sigmas option
DPM_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")  # diffusers' algorithm_type of dpm_solver_pp; first: default
# Samplers that can start part-way, from a noised image (img2img); PLMS cannot: its pseudo-Heun warm-up has no
# reference for a late start (diffusers' PNDM img2img slices its duplicated warm-up timestep list off by one).
IMG2IMG_SAMPLER_NAMES = ("ddim", "dpm_solver_pp", "unipc")

# Default guidance scale per family (Stability's sampling scripts: 7.5 for SD1, 9.0 for SD2).
DEFAULT_GUIDANCE = {"sd1": 7.5, "sd2": 9.0}


class UnknownFamilyError(ValueError):
    """A config or file names a text encoder that is neither SD1's nor SD2's."""


def check_family(family: Any, source: Any = None) -> str:
    """``family`` if it is one of :data:`FAMILIES`; raises :class:`UnknownFamilyError` otherwise, its message
    starting with ``source`` (the file or object that named the family) when given."""
    if family not in FAMILIES:
        where = f"{source}: " if source else ""
        raise UnknownFamilyError(f"{where}family must be one of {FAMILIES}, got {family!r}")
    return family


def model_node(config: Any) -> dict:
    """The ``model`` node of a model config (YAML DictConfig or plain dict) as a plain dict."""
    node = config["model"] if "model" in config else config
    if hasattr(node, "keys") and not isinstance(node, dict):
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    return node


def family_of_config(config: Any) -> str:
    """``sd1``/``sd2`` from the text-encoder target of a model config: the one place a family is derived."""
    target = model_node(config)["params"]["cond_stage_config"]["target"]
    for family, name in TEXT_ENCODER_CLASSES.items():
        if target == name:
            return family
    raise UnknownFamilyError(
        f"unknown text encoder target {target!r} (expected one of {sorted(TEXT_ENCODER_CLASSES.values())})"
    )


def family_of_state_dict(state_dict) -> str | None:
    """``sd1``/``sd2`` from the text-encoder keys of a full state dict in our names; None without text encoder."""
    for family, root in TEXT_ROOTS.items():
        if any(key.startswith(root) for key in state_dict):
            return family
    return None
