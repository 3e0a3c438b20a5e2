"""The LoRA adapter file: the one owner of its names, metadata, reading and writing (NumPy only, no MindSpore).

A file is ``.safetensors`` with, per module, ``<module>.lora_down.weight`` ``[r, in]``, ``<module>.lora_up.weight``
``[out, r]`` and ``<module>.alpha`` (scalar), where ``<module>`` is the network's own module path: the original-LDM
name of the adapted layer (``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``,
``cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj`` for SD1) or, for SD2's fused OpenCLIP
q/k/v, ``cond_stage_model.model.transformer.resblocks.0.attn.in_proj_lora`` (up ``[3d, r]``). These are exactly the
parameter names of an injected network, so a file, the trainer's parameters and its train state agree without any
renaming. The header key ``ldm_lora`` holds JSON: ``family`` (``sd1``/``sd2``), ``rank`` and ``alpha`` (the most
common ones), ``targets``, ``context_dim`` and ``parameterization``.

Each module's delta is ``dW = alpha / rank * up @ down`` (:func:`delta_weight`, the one place it is computed); a
module without an ``.alpha`` tensor takes the metadata ``alpha``, else its rank (scale 1).

Older files still read: the fused module spelled ``attn.in_proj`` (written by the former ``ldm.lora_tools``) is
renamed to ``attn.in_proj_lora``, and the former network metadata (``lora.family``/``lora.modules`` with per-module
alphas) is understood.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ldm.io.checkpoint import CheckpointError, read_metadata, read_state_dict, write_state_dict
from ldm.names import TEXT_PREFIX, TEXT_ROOTS, UNET_PREFIX, check_family

META_KEY = "ldm_lora"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
FUSED_IN_PROJ = "in_proj_lora"  # the attribute of an OpenCLIP attention cell that holds its fused q/k/v LoRA
_LEGACY_FUSED = re.compile(r"(.+\.attn)\.in_proj(\.lora_down\.weight|\.lora_up\.weight|\.alpha)")
_LEGACY_METADATA = "lora.format"


class Module(NamedTuple):
    """One LoRA module: ``dW = alpha / rank * up @ down``."""

    down: np.ndarray  # [rank, in]
    up: np.ndarray  # [out, rank]
    alpha: float


def delta_weight(down: np.ndarray, up: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha / rank * up @ down`` in float64: the weight change of one LoRA module."""
    return float(alpha) / down.shape[0] * (up.astype(np.float64) @ down.astype(np.float64))


def module_scale(down: np.ndarray, alpha: float) -> float:
    """PEFT's ``lora_alpha / r`` of one module."""
    return float(alpha) / down.shape[0]


def fused_weight_key(path: str) -> str | None:
    """``<attn>.in_proj_weight`` for a fused q/k/v module path, else None."""
    suffix = "." + FUSED_IN_PROJ
    return path[: -len(suffix)] + ".in_proj_weight" if path.endswith(suffix) else None


def _canonical(key: str) -> str:
    """The current name of a key: the legacy fused ``attn.in_proj`` becomes ``attn.in_proj_lora``."""
    match = _LEGACY_FUSED.fullmatch(key)
    return f"{match.group(1)}.{FUSED_IN_PROJ}{match.group(2)}" if match else key


def _err(source, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


@dataclass
class Adapter:
    """A LoRA adapter: ``state`` holds the file's arrays (current names), ``meta`` the ``ldm_lora`` JSON."""

    state: dict
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.state = {_canonical(k): v for k, v in self.state.items()}


def modules(adapter: Adapter, source="adapter") -> dict:
    """``{module path: (down, up, alpha)}``, checking keys, shapes, ranks and the family of the text-encoder names."""
    family = check_family(adapter.meta.get("family"), f"{source} metadata")
    default_alpha = adapter.meta.get("alpha")
    parts: dict = {}
    for key, value in adapter.state.items():
        for suffix, slot in ((DOWN, 0), (UP, 1), (ALPHA, 2)):
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], [None, None, None])[slot] = np.asarray(value)
                break
        else:
            raise _err(source, f"key {key!r} is not a LoRA key (expected <module>{DOWN}, {UP} or {ALPHA})")
    out = {}
    for path, (down, up, alpha) in sorted(parts.items()):
        if down is None or up is None:
            missing, have = (DOWN, UP) if down is None else (UP, DOWN)
            raise _err(source, f"key {path + have!r} has no matching {path + missing!r}")
        if not path.startswith((UNET_PREFIX, TEXT_PREFIX)):
            raise _err(source, f"module {path!r} is neither under {UNET_PREFIX!r} nor {TEXT_PREFIX!r}")
        if path.startswith(TEXT_PREFIX) and not path.startswith(TEXT_ROOTS[family]):
            raise _err(source, f"module {path!r} is not a {family} text-encoder name (expected {TEXT_ROOTS[family]}*)")
        if down.ndim != 2 or up.ndim != 2:
            raise _err(source, f"{path}: LoRA factors must be 2-D, got down {down.shape}, up {up.shape}")
        if down.shape[0] != up.shape[1]:
            raise _err(
                source,
                f"{path}: rank mismatch: {path + DOWN} has rank {down.shape[0]}, {path + UP} has rank {up.shape[1]}",
            )
        if alpha is not None:
            if alpha.size != 1 or not np.isfinite(alpha).all():
                raise _err(source, f"key {path + ALPHA!r} must be one finite number, got shape {alpha.shape}")
            alpha = float(alpha.reshape(()))
        elif default_alpha is not None:
            alpha = float(default_alpha)
        else:
            alpha = float(down.shape[0])
        out[path] = Module(down, up, alpha)
    if not out:
        raise _err(source, "holds no LoRA modules")
    return out


def target_of(path: str) -> str:
    """The dotted suffix naming the layer inside its block (``attn1.to_q``, ``self_attn.q_proj``,
    ``attn.in_proj_lora``)."""
    match = re.search(r"(?:transformer_blocks|layers|resblocks)\.\d+\.(.+)$", path)
    if match:
        return match.group(1)
    return path.rsplit(".", 1)[-1]


def make_adapter(mods: dict, meta: dict) -> Adapter:
    """An :class:`Adapter` from ``{module: (down, up, alpha)}``; every module gets an ``.alpha`` tensor and the
    metadata's ``rank``/``alpha``/``targets`` are recomputed (most common rank and alpha)."""
    state = {}
    for path, (down, up, alpha) in sorted(mods.items()):
        state[path + DOWN] = np.ascontiguousarray(down, dtype=np.float32)
        state[path + UP] = np.ascontiguousarray(up, dtype=np.float32)
        state[path + ALPHA] = np.asarray(alpha, dtype=np.float32)
    ranks = Counter(int(down.shape[0]) for down, _, _ in mods.values())
    alphas = Counter(float(np.float32(alpha)) for _, _, alpha in mods.values())
    meta = {
        "family": meta.get("family"),
        "context_dim": meta.get("context_dim"),
        "parameterization": meta.get("parameterization"),
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "alpha": alphas.most_common(1)[0][0] if alphas else None,
        "targets": sorted({target_of(p) for p in mods}),
    }
    return Adapter(state, meta)


def _legacy_meta(metadata: dict, state: dict, source) -> dict:
    """Metadata of files written with the former network metadata (``lora.*`` keys); per-module alphas become
    ``.alpha`` tensors."""
    try:
        targets = json.loads(metadata.get("lora.targets", "[]"))
        for name, info in json.loads(metadata.get("lora.modules", "{}")).items():
            state.setdefault(_canonical(name + ALPHA), np.asarray(float(info["alpha"]), dtype=np.float32))
    except (ValueError, KeyError, TypeError) as e:
        raise _err(source, f"unreadable lora.* metadata: {e}") from None
    return {"family": metadata.get("lora.family") or None, "targets": targets}


def read_adapter(path) -> Adapter:
    """Read an adapter file; raises :class:`CheckpointError` naming the file and the offending key."""
    adapter = Adapter(read_state_dict(path))
    metadata = read_metadata(path)
    if META_KEY in metadata:
        try:
            meta = json.loads(metadata[META_KEY])
        except ValueError as e:
            raise _err(path, f"metadata {META_KEY!r} is not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise _err(path, f"metadata {META_KEY!r} must be a JSON object")
    elif _LEGACY_METADATA in metadata:
        meta = _legacy_meta(metadata, adapter.state, path)
    else:
        raise _err(
            path,
            f"no {META_KEY!r} metadata (family unknown); is this one of our LoRA files? "
            "(use 'import' for diffusers/kohya files)",
        )
    if meta.get("family") is None:
        raise _err(path, f"metadata {META_KEY!r} has no 'family' (sd1 or sd2)")
    adapter.meta = meta
    modules(adapter, path)
    return adapter


def write_adapter(path, adapter: Adapter) -> None:
    """Validate and write atomically as ``.safetensors`` with the ``ldm_lora`` metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise _err(path, "LoRA adapters are written as .safetensors (metadata is needed)")
    modules(adapter, path)
    write_state_dict(path, adapter.state, {META_KEY: json.dumps(adapter.meta, sort_keys=True)})


def without_text_encoder(adapter: Adapter) -> Adapter:
    """The adapter restricted to its UNet modules."""
    return Adapter({k: v for k, v in adapter.state.items() if not k.startswith(TEXT_PREFIX)}, dict(adapter.meta))
