"""Whole-model checkpoints: read any supported source into our names, load strictly, save atomically.

Sources: our own single files and Stability/CompVis single files (``.safetensors``, MindSpore ``.ckpt``, and PyTorch
pickles only with ``allow_pickle``) share the original-LDM names; mindone's MindSpore checkpoints (``gamma``/``beta``
names) and diffusers folders go through their key maps. The
only keys a Stability file may carry beyond our parameters are the DDPM schedule buffers (checked against our
schedule, then dropped), EMA copies (``model_ema.*``) and the text-encoder keys SD2 does not use; anything else
is reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from ldm.io import text_encoder_keys
from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.io.diffusers_format import is_diffusers_folder, read_diffusers_folder
from ldm.io.loading import LoadReport, load_state_dict_into, match_state_dict
from ldm.io.mindone_keys import is_mindone_state_dict, mindone_to_ldm
from ldm.io.model_config import CONFIG_METADATA_KEY
from ldm.names import TEXT_PREFIX, check_family, family_of_config

EMA_PREFIX = "model_ema."
# Buffers of the original LDM ``DDPM`` class found in Stability checkpoints; our model recomputes them.
SCHEDULE_BUFFER_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)


def model_family(model) -> str:
    """``sd1``/``sd2`` of a built LatentDiffusion: the ``family`` its text encoder declares."""
    return check_family(model.cond_stage_model.family)


def _check_schedule(raw: dict[str, np.ndarray], model, path: Path) -> None:
    stored = raw.get("alphas_cumprod")
    if stored is not None and stored.shape == model.alphas_cumprod.shape:
        if not np.allclose(stored.astype(np.float64), model.alphas_cumprod, rtol=1e-4, atol=1e-6):
            raise CheckpointError(f"{path}: key 'alphas_cumprod' differs from the config's noise schedule")


def read_ldm_file(path: str | Path, model, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Our names from a single-file checkpoint (ours or Stability's): schedule buffers, EMA copies and unused
    text-encoder keys are dropped; everything else is passed on for strict loading."""
    path = Path(path)
    raw = read_state_dict(path, allow_pickle=allow_pickle)
    _check_schedule(raw, model, path)
    family = model_family(model)
    if is_mindone_state_dict(raw):
        try:
            raw = mindone_to_ldm(raw, family)
        except KeyError as exc:
            raise CheckpointError(f"{path}: {exc.args[0]}") from None
    layers = _text_layers(model)
    out: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if key in SCHEDULE_BUFFER_KEYS or key.startswith(EMA_PREFIX):
            continue
        if key.startswith(TEXT_PREFIX):
            text[key[len(TEXT_PREFIX) :]] = value
        else:
            out[key] = value
    try:
        text = text_encoder_keys.checkpoint_to_ldm(text, family, layers)
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]}") from None
    out.update({TEXT_PREFIX + k: v for k, v in text.items()})
    return out


def _text_layers(model) -> int:
    names = [p.name for p in model.cond_stage_model.get_parameters()]
    marker = ".resblocks." if model_family(model) == "sd2" else ".layers."
    return len({n.split(marker)[1].split(".")[0] for n in names if marker in n})


def read_any(path: str | Path, model, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """State dict in our names from a diffusers folder or a single file."""
    if is_diffusers_folder(path):
        return read_diffusers_folder(path, allow_pickle=allow_pickle)[0]
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: a folder but not a diffusers pipeline (no unet/config.json)")
    return read_ldm_file(path, model, allow_pickle=allow_pickle)


def load_pretrained(model, path: str | Path, allow_pickle: bool = False) -> LoadReport:
    """Strictly load a checkpoint into ``model``: any missing, unexpected or mis-shaped key is an error.

    Each array is freed as soon as it is in its parameter, so a model built with uninitialised parameters
    (``build_model_from_config(config, uninitialised=True)``) peaks at about one copy of the weights."""
    return load_state_dict_into(model, read_any(path, model, allow_pickle=allow_pickle), source=str(path), consume=True)


def read_pretrained(model, path: str | Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The arrays :func:`load_pretrained` would put into ``model``, without setting its parameters: checked by the
    same strict rules against its names and shapes, cast to its parameter dtypes, in its parameter order. For
    conversion, where the model is only the reference the file is checked against (it may stay uninitialised)."""
    state = read_any(path, model, allow_pickle=allow_pickle)
    report = match_state_dict(model, state, source=str(path))
    params = model.parameters_dict()
    loaded = set(report.loaded)
    return {
        key: state.pop(key).astype(ms.dtype_to_nptype(param.dtype), copy=False)
        for key, param in params.items()
        if key in loaded
    }


def save_model(model, path: str | Path, config: Any = None, dtype: str = "float32") -> None:
    """Write ``model``'s weights (our names) atomically; ``.safetensors`` files also embed the model config.

    The arrays written are the parameters' own memory where ``asnumpy`` aliases it (CPU), not copies: nothing changes
    the weights while they are written, and a full-size model is saved without a second copy of its weights."""
    save_state_dict({name: p.asnumpy() for name, p in model.parameters_dict().items()}, path, config, dtype)


def save_state_dict(state: dict[str, np.ndarray], path: str | Path, config: Any = None, dtype: str = "float32") -> None:
    """Write a whole-model state dict in our names atomically (``.safetensors`` files also embed the model config).

    With ``dtype="float16"`` the float32 arrays of ``state`` are replaced by their float16 copies one at a time, so
    the conversion never holds both precisions of all the weights; ``state`` is changed in place."""
    if dtype == "float16":
        for key, value in state.items():
            if value.dtype == np.float32:
                state[key] = value.astype(np.float16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    metadata = None
    if config is not None and str(path).endswith(".safetensors"):
        metadata = {CONFIG_METADATA_KEY: json.dumps(_plain(config)), "family": family_of_config(config)}
    write_state_dict(path, state, metadata=metadata)


def _plain(config: Any) -> Any:
    if hasattr(config, "keys") and not isinstance(config, dict):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return config
