"""LoRA adapters as PEFT folders: the ``save_pretrained`` layout that peft-based trainers write and
``PeftModel.from_pretrained`` loads.

A PEFT folder holds ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (``<module path>`` as in the diffusers UNet or the
transformers CLIP text model). A run folder holds one per network: ``unet/`` and/or ``text_encoder/``.

Scale: PEFT's ``lora_alpha / r`` per module (``rank_pattern``/``alpha_pattern`` matched as PEFT does), or
``lora_alpha / sqrt(r)`` with ``use_rslora``, which import turns into our ``alpha = lora_alpha * sqrt(r)``. DoRA
(``use_dora``, ``lora_magnitude_vector``) is read and written; ``LoHaConfig``/``LoKrConfig`` folders (``alpha``,
``hada_*``/``lokr_*``) are read, PEFT's LoKr scale ``alpha / r`` folded into ``lokr_w1`` where neither factor is
decomposed (LyCORIS scales those by 1). Config fields that change what the layers compute and that our layers do not
implement (LoRA bias, ``modules_to_save``, ...) are refused by name; so is any field this reader does not know unless
it holds its neutral value (off/empty).
Export writes the text-encoder names the installed transformers uses (no ``text_model.``, see
:mod:`ldm.lora.interop`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ldm.atomic import atomic_folder, write_json
from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.lora.adapter import Adapter
from ldm.lora.interop import (
    MAGNITUDE_KEY,
    PRODUCT_PARTS,
    UNetLayout,
    exported_modules,
    import_modules,
    installed_text_path,
    lora_factors,
    peft_config,
    peft_magnitude,
    peft_pattern_value,
    unsupported_part,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
COMPONENTS = ("unet", "text_encoder")
_KEY = re.compile(rf"base_model\.model\.(.+?)\.(lora_A\.weight|lora_B\.weight|{MAGNITUDE_KEY}|[a-z0-9_]+)")
_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", MAGNITUDE_KEY: "dora_scale"}
_PEFT_TYPES = ("LORA", "LOHA", "LOKR")
_TEXT_ROOTS = ("text_model.", "encoder.", "embeddings.", "final_layer_norm")
# read and used
_USED = {
    "r",
    "lora_alpha",
    "alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
}
# no effect on what loaded weights compute (bookkeeping, training-time dropout, initialisation schemes)
_INERT = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "qalora_group_size",
    "init_weights",  # LoHa/LoKr: initialisation, and the factors' shapes below say how they were built
    "rank_dropout",
    "module_dropout",
    "rank_dropout_scale",
    "use_effective_conv2d",
    "decompose_both",
    "decompose_factor",
}
_WHY = {
    "lora_bias": "the LoRA layers here have no bias on lora_B",
    "bias": "bias training changes base biases, which an adapter here cannot carry",
    "modules_to_save": "fully trained modules are not LoRA factors",
    "fan_in_fan_out": "transposed (Conv1D) weights do not occur in Stable Diffusion",
}


def _err(source, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


def _neutral(value) -> bool:
    """A config value that switches nothing on: null, false, empty, or PEFT's ``bias: "none"``."""
    return value is None or value is False or value in ("", "none") or (isinstance(value, (list, dict)) and not value)


def is_peft_folder(path) -> bool:
    """A PEFT folder, or a run folder holding one per network."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or any((path / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def _read_config(folder: Path) -> dict:
    source = folder / CONFIG_NAME
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _err(source, f"unreadable: {e}") from None
    if not isinstance(config, dict):
        raise _err(source, "must hold a JSON object")
    if config.get("peft_type", "LORA") not in _PEFT_TYPES:
        raise _err(source, f"peft_type {config['peft_type']!r} is not supported (only {', '.join(_PEFT_TYPES)})")
    for key, value in config.items():
        if key not in _USED and key not in _INERT and not _neutral(value):
            why = _WHY.get(key, "not implemented here")
            raise _err(source, f"field {key!r} = {json.dumps(value)} is not supported ({why})")
    _check_types(config, source)
    return config


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(config: dict, source) -> None:
    """The fields this reader uses have PEFT's types (patterns: valid regexes mapping to numbers)."""
    if not isinstance(config.get("r"), int) or isinstance(config["r"], bool) or config["r"] <= 0:
        raise _err(source, f"field 'r' must be a positive integer, got {json.dumps(config.get('r'))}")
    for field in ("lora_alpha", "alpha"):
        if not _number(config.get(field, 8)):
            raise _err(source, f"field {field!r} must be a number, got {json.dumps(config[field])}")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(_number(v) for v in patterns.values()):
            raise _err(source, f"field {field!r} must map module patterns to numbers")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise _err(source, f"field {field!r}: {pattern!r} is not a regular expression: {e}") from None
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if not (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise _err(source, f"field {field!r} must be a regular expression or a list of module names")


def _targeted(config: dict, path: str) -> bool:
    """PEFT's rule: a string ``target_modules`` is a full-match regex, a list names dotted suffixes; the same for
    ``exclude_modules``, which wins."""

    def hits(spec) -> bool:
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, path) is not None
        return any(path == t or path.endswith("." + t) for t in spec or ())

    targets = config.get("target_modules")
    return (targets is None or hits(targets)) and not hits(config.get("exclude_modules"))


def _component_of(path: str) -> str:
    return "text_encoder" if path.startswith(_TEXT_ROOTS) else "unet"


def _read_network(folder: Path, found: dict, alpha_of: dict) -> None:
    """Add one PEFT folder's modules to ``found`` (``{(component, path): [down, up, None]}``)."""
    config = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        other = "; adapter_model.bin (pickle) is not read" if (folder / "adapter_model.bin").is_file() else ""
        raise _err(folder, f"no {WEIGHTS_NAME}{other}")
    components = set()
    for key, value in read_state_dict(weights).items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise _err(weights, f"key {key!r} is not a LoRA factor (base_model.model.<module>.lora_A/lora_B.weight)")
        path, part = match.groups()
        part = _PARTS.get(part, part)
        if part not in _PARTS.values() and part not in PRODUCT_PARTS:
            raise unsupported_part(part, key, weights)
        if not _targeted(config, path):
            raise _err(weights, f"module {path!r} is outside target_modules/exclude_modules of {CONFIG_NAME}")
        component = _component_of(path)
        components.add(component)
        found.setdefault((component, path), {})[part] = value
        alpha_of[(component, path)] = (config, folder)
    if len(components) > 1:
        raise _err(weights, "mixes UNet and text-encoder modules; PEFT folders hold one network each")
    if folder.name in COMPONENTS and components and components != {folder.name}:
        raise _err(weights, f"holds {components.pop()} modules but the folder is named {folder.name!r}")


def _alpha(config: dict, folder: Path, path: str, rank: int | None) -> float:
    """Our alpha (``scale * rank``) of one module; the file's rank must be what ``rank_pattern``/``r`` say. ``rank``
    None (a LoKr with neither factor decomposed) gives PEFT's scale ``alpha / r`` itself, which
    :func:`_fold_lokr_scale` moves into the factors."""
    declared = int(peft_pattern_value(config.get("rank_pattern"), path, config["r"]))
    if rank is not None and declared != rank:
        raise _err(folder, f"module {path!r} has rank {rank} but {CONFIG_NAME} gives r = {declared}")
    default = config.get("lora_alpha", config.get("alpha", 8))
    alpha = float(peft_pattern_value(config.get("alpha_pattern"), path, default))
    if rank is None:
        return alpha / declared
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _fold_lokr_scale(found: dict, alpha_of: dict) -> None:
    """PEFT scales every LoKr by ``alpha / r``, LyCORIS (our convention) a LoKr with neither factor decomposed by 1:
    such a module gets PEFT's scale multiplied into ``lokr_w1`` (alpha 1)."""
    for (component, path), parts in found.items():
        if "lokr_w1" in parts and "lokr_w2" in parts:
            scale = _alpha(*alpha_of[(component, path)], path, None)
            parts["lokr_w1"] = (np.asarray(parts["lokr_w1"], np.float64) * scale).astype(np.float32)
            parts["alpha"] = np.float32(1.0)


def read_peft_folder(folder, family: str, layout: UNetLayout, skip_conv: bool = False) -> Adapter:
    """Our adapter from a PEFT folder or a run folder with ``unet/`` and/or ``text_encoder/``."""
    folder = Path(folder)
    found, alpha_of = {}, {}
    if (folder / CONFIG_NAME).is_file():
        _read_network(folder, found, alpha_of)
    else:
        subfolders = [folder / c for c in COMPONENTS if (folder / c / CONFIG_NAME).is_file()]
        if not subfolders:
            raise _err(folder, f"no {CONFIG_NAME} here nor in unet/ or text_encoder/ (not a PEFT folder)")
        for sub in subfolders:
            _read_network(sub, found, alpha_of)
    _fold_lokr_scale(found, alpha_of)
    return import_modules(
        found,
        family,
        layout,
        skip_conv,
        folder,
        lambda c, p: f"{c}/{p}",
        lambda c, p, r: _alpha(*alpha_of[(c, p)], p, r),
    )


def write_peft_folder(folder, adapter: Adapter, layout: UNetLayout, overwrite: bool = False) -> list:
    """Write ``folder/unet`` and ``folder/text_encoder`` (those the adapter has) in the ``save_pretrained`` layout;
    the whole folder appears at once (built beside it, then renamed). Returns the subfolders written."""
    folder = Path(folder)
    if folder.suffix.lower() in (".safetensors", ".ckpt", ".bin"):
        raise _err(folder, "a PEFT export is a folder; give a folder name without a file extension")
    if folder.exists() and not overwrite:
        raise _err(folder, "already exists (pass --overwrite to replace it)")
    networks: dict = {}
    for component, path, module, conv, magnitude in exported_modules(adapter, layout, folder):
        path = installed_text_path(path) if component == "text_encoder" else path
        networks.setdefault(component, []).append((path, module, conv, magnitude))
    with atomic_folder(folder, overwrite=True) as build:
        for component, items in networks.items():
            state, entries = {}, []
            for path, module, conv, magnitude in items:
                down, up = lora_factors(module, conv, False)
                state[f"base_model.model.{path}.lora_A.weight"] = down
                state[f"base_model.model.{path}.lora_B.weight"] = up
                if magnitude is not None:
                    state[f"base_model.model.{path}.{MAGNITUDE_KEY}"] = peft_magnitude(magnitude, conv)
                entries.append((path, int(down.shape[0]), float(module.alpha)))
            dora = any(m is not None for _, _, _, m in items)
            config = {
                "peft_type": "LORA",
                "task_type": None,
                "base_model_name_or_path": None,
                "inference_mode": True,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "lora_bias": False,
                "init_lora_weights": True,
                **peft_config(entries, use_dora=dora),
            }
            (build / component).mkdir()
            write_state_dict(build / component / WEIGHTS_NAME, state, {"format": "pt"})
            write_json(build / component / CONFIG_NAME, config, sort_keys=True)
    return sorted(networks)
