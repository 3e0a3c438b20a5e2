"""LoRA adapter files: read/write ours, export/import diffusers (PEFT) and kohya files, merge and combine adapters.

    python -m ldm.lora_tools {export,import,merge,combine} -h

Our format is a ``.safetensors`` file with keys ``<module>.lora_down.weight`` ``[r, in]``, ``<module>.lora_up.weight``
``[out, r]`` and optional ``<module>.alpha`` (scalar), where ``<module>`` is the full original-LDM module path
(``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``, ``cond_stage_model.transformer.text_model
.encoder.layers.0.self_attn.q_proj`` for SD1, ``cond_stage_model.model.transformer.resblocks.0.attn.in_proj`` for
SD2's fused q/k/v, up ``[3d, r]``). The header's ``ldm_lora`` metadata is JSON with ``rank``, ``alpha``, ``targets``,
``family`` (``sd1``/``sd2``), ``context_dim`` and ``parameterization``. Each module's delta is
``dW = alpha / rank * up @ down``; a module without an ``.alpha`` tensor takes the metadata ``alpha``, else its rank
(scale 1). Files this module writes always carry an ``.alpha`` per module. Reading also accepts the metadata of
:func:`ldm.lora.lora_metadata` (``lora.family``/``lora.modules``) and its fused module name
``attn.in_proj_lora`` (imports write ``attn.in_proj``; both are read).

Scale conventions on export/import (``dW`` is preserved exactly, i.e. the factors are copied bit for bit):

* diffusers/PEFT files carry no alpha tensors; PEFT scales by ``lora_alpha / r``. Export writes the header key
  ``lora_adapter_metadata`` (PEFT ``LoraConfig`` fields prefixed ``unet.``/``text_encoder.``: ``r``, ``lora_alpha``,
  ``rank_pattern``, ``alpha_pattern``, ``target_modules``), which diffusers (0.42: ``load_lora_weights`` and
  ``load_lora_adapter`` read it from the file) turns into the ``LoraConfig`` as is. For loaders that ignore it,
  ``fold_scale=True`` multiplies ``lora_B`` by ``alpha / r`` and writes no metadata (implied alpha = r; exact up to one
  float32 rounding of ``B``). Import takes alpha from that metadata (PEFT's pattern matching), else from legacy
  ``<module>.alpha`` keys, else alpha = r.
* kohya: ``dW = alpha / r * up @ down`` with an ``.alpha`` tensor per module (kohya trains with ``--network_alpha``
  default 1, i.e. scale 1/r, and stores it). Export always writes ``.alpha``. A module without one gets alpha = r
  (scale 1), as kohya's own loader and diffusers do for old files.

SD2's fused ``in_proj`` (OpenCLIP) against separate q/k/v LoRAs (HF CLIP names in diffusers/kohya files):

* Export splits a fused rank-r LoRA (down ``[r, d]``, up ``[3d, r]``) into three rank-r LoRAs that share the down and
  take their third of the up: exact. Columns whose up-third is zero are dropped (they add nothing), so a join followed
  by a split gives back the original ranks.
* Import joins the q/k/v LoRAs of a layer into one fused LoRA of rank ``r_q + r_k + r_v``: downs stacked ``[3r, d]``,
  ups block-diagonal ``[3d, 3r]`` (a missing projection contributes zero rows): exact. Unequal scales are folded into
  the up blocks (alpha = rank).

1x1-convolution LoRAs (SD1 ``proj_in``/``proj_out``: ``[r, in, 1, 1]``) are stored squeezed to 2-D and re-expanded
on export for SD1 and on merge (to the base weight's shape). Larger conv LoRAs (LoCon) are refused, or dropped with
``skip_conv``.

Merges: :func:`merge_into_base` adds ``weight * dW`` to the base weights (cloneofsimo ``upl``; the fused delta goes
to ``in_proj_weight``). :func:`combine_lpl` is cloneofsimo's ``lpl``: ``w1 * f_a + w2 * f_b`` for each factor, so
``dW = (w1 U_a + w2 U_b)(w1 D_a + w2 D_b)``, which is NOT ``w1 dW_a + w2 dW_b`` (an approximation kept for
compatibility). :func:`combine_svd` forms the exact ``w1 dW_a + w2 dW_b`` and truncates its SVD to the requested rank,
reporting the relative Frobenius error of every module; at rank >= ``r_a + r_b`` it is exact up to float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldm.io import text_encoder_keys, unet_keys
from ldm.io.checkpoint import CheckpointError, read_metadata, read_state_dict, write_state_dict

FAMILIES = ("sd1", "sd2")
META_KEY = "ldm_lora"
UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond_stage_model."
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_TE_ROOTS = {"sd1": TE_PREFIX + "transformer.", "sd2": TE_PREFIX + "model."}
_FUSED = re.compile(r"(.+\.attn)\.in_proj(?:_lora)?")
_QKV = ("q", "k", "v")
_HF_QKV = re.compile(r"(text_model\.encoder\.layers\.\d+\.self_attn)\.([qkv])_proj")
_CONV1X1 = re.compile(r"proj_in|proj_out")

Module = tuple  # (down [r, in], up [out, r], alpha: float)


@dataclass
class Adapter:
    """A LoRA adapter in our format: ``state`` holds the file's arrays, ``meta`` the ``ldm_lora`` JSON."""

    state: dict
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UNetLayout:
    """The UNet arguments the LDM <-> diffusers block map depends on (defaults: SD 1.x/2.x)."""

    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    attention_resolutions: tuple = (4, 2, 1)
    transformer_depth: int = 1

    def key_args(self) -> dict:
        return {
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": tuple(self.channel_mult),
            "attention_resolutions": tuple(self.attention_resolutions),
        }


@dataclass
class SvdReport:
    """Relative Frobenius error ``||dW - dW_r|| / ||dW||`` of every module and over all modules together."""

    per_module: dict
    overall: float


# ----------------------------------------------------------------------------------------------------------- our IO


def _err(source, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


def module_scale(down: np.ndarray, alpha: float) -> float:
    return float(alpha) / down.shape[0]


def delta_weight(module: Module) -> np.ndarray:
    """``alpha / rank * up @ down`` in float64."""
    down, up, alpha = module
    return module_scale(down, alpha) * (up.astype(np.float64) @ down.astype(np.float64))


def _check_family(family, source) -> str:
    if family not in FAMILIES:
        raise _err(source, f"metadata family must be one of {FAMILIES}, got {family!r}")
    return family


def modules(adapter: Adapter, source="adapter") -> dict:
    """``{module path: (down, up, alpha)}``, checking keys, shapes, ranks and the family of the text-encoder names."""
    family = _check_family(adapter.meta.get("family"), source)
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
        if not path.startswith((UNET_PREFIX, TE_PREFIX)):
            raise _err(source, f"module {path!r} is neither under {UNET_PREFIX!r} nor {TE_PREFIX!r}")
        if path.startswith(TE_PREFIX) and not path.startswith(_TE_ROOTS[family]):
            raise _err(source, f"module {path!r} is not a {family} text-encoder name (expected {_TE_ROOTS[family]}*)")
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
        out[path] = (down, up, alpha)
    if not out:
        raise _err(source, "holds no LoRA modules")
    return out


def _target_of(path: str) -> str:
    """The dotted suffix naming the layer inside its block (``attn1.to_q``, ``self_attn.q_proj``, ``attn.in_proj``)."""
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
    ranks = Counter(int(m[0].shape[0]) for m in mods.values())
    alphas = Counter(float(np.float32(m[2])) for m in mods.values())
    meta = {
        "family": meta.get("family"),
        "context_dim": meta.get("context_dim"),
        "parameterization": meta.get("parameterization"),
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "alpha": alphas.most_common(1)[0][0] if alphas else None,
        "targets": sorted({_target_of(p) for p in mods}),
    }
    return Adapter(state, meta)


def _meta_from_ldm_lora_py(metadata: dict, state: dict, source) -> dict:
    """Our metadata from :func:`ldm.lora.lora_metadata`'s keys; per-module alphas become ``.alpha`` tensors."""
    try:
        targets = json.loads(metadata.get("lora.targets", "[]"))
        for name, info in json.loads(metadata.get("lora.modules", "{}")).items():
            state.setdefault(name + ALPHA, np.asarray(float(info["alpha"]), dtype=np.float32))
    except (ValueError, KeyError, TypeError) as e:
        raise _err(source, f"unreadable lora.* metadata: {e}") from None
    return {"family": metadata.get("lora.family") or None, "targets": targets}


def read_adapter(path) -> Adapter:
    """Read one of our adapter files; raises :class:`CheckpointError` naming the file and the offending key."""
    state = read_state_dict(path)
    metadata = read_metadata(path)
    if META_KEY in metadata:
        try:
            meta = json.loads(metadata[META_KEY])
        except ValueError as e:
            raise _err(path, f"metadata {META_KEY!r} is not JSON: {e}") from None
        if not isinstance(meta, dict):
            raise _err(path, f"metadata {META_KEY!r} must be a JSON object")
    elif "lora.format" in metadata:
        meta = _meta_from_ldm_lora_py(metadata, state, path)
    else:
        raise _err(
            path,
            f"no {META_KEY!r} metadata (family unknown); is this one of our LoRA files? "
            "(use 'import' for diffusers/kohya files)",
        )
    if meta.get("family") is None:
        raise _err(path, f"metadata {META_KEY!r} has no 'family' (sd1 or sd2)")
    adapter = Adapter(state, meta)
    modules(adapter, path)
    return adapter


def write_adapter(path, adapter: Adapter) -> None:
    """Validate and write atomically as ``.safetensors`` with the ``ldm_lora`` metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise _err(path, "LoRA adapters are written as .safetensors (metadata is needed)")
    modules(adapter, path)
    write_state_dict(path, adapter.state, {META_KEY: json.dumps(adapter.meta, sort_keys=True)})


# ---------------------------------------------------------------------------------------------------- name mapping


def _unet_to_diffusers(path: str, layout: UNetLayout) -> str:
    rel = path[len(UNET_PREFIX) :] + ".weight"
    try:
        (key,) = unet_keys.ldm_to_diffusers({rel: None}, **layout.key_args())
    except KeyError as e:
        raise CheckpointError(f"UNet module {path!r} is not in the UNet layout given: {e}") from None
    return key[: -len(".weight")]


def _unet_from_diffusers(dpath: str, layout: UNetLayout) -> str:
    try:
        (key,) = unet_keys.diffusers_to_ldm({dpath + ".weight": None}, **layout.key_args())
    except KeyError as e:
        raise CheckpointError(f"diffusers UNet module {dpath!r} is not in the UNet layout given: {e}") from None
    return UNET_PREFIX + key[: -len(".weight")]


def _te_to_hf(path: str, family: str) -> list:
    """HF CLIP module paths of one of our text-encoder modules (three for a fused in_proj)."""
    rel = path[len(TE_PREFIX) :]
    fused = _FUSED.fullmatch(rel)
    fake = {f"{fused.group(1)}.in_proj_weight": np.zeros((3, 1))} if fused else {rel + ".weight": None}
    try:
        keys = text_encoder_keys.ldm_to_diffusers(fake, family)
    except KeyError as e:
        raise CheckpointError(f"{family} text-encoder module {path!r} has no transformers name: {e}") from None
    return [k[: -len(".weight")] for k in keys]


def _te_from_hf(hf_path: str, family: str) -> str:
    """Our module path of a non-q/k/v-fused HF CLIP module (SD2 q/k/v are joined by :func:`_join_qkv`)."""
    try:
        (key,) = text_encoder_keys.diffusers_to_ldm({hf_path + ".weight": None}, family)
    except KeyError as e:
        raise CheckpointError(f"{family} text-encoder module {hf_path!r} is unknown: {e}") from None
    return TE_PREFIX + key[: -len(".weight")]


def _is_conv1x1(path: str, family: str) -> bool:
    """SD1's transformer ``proj_in``/``proj_out`` are 1x1 convolutions (SD2 uses Linear)."""
    return family == "sd1" and path.startswith(UNET_PREFIX) and _CONV1X1.fullmatch(path.rsplit(".", 1)[-1]) is not None


def _split_fused(module: Module) -> list:
    """Three (down, up, alpha) LoRAs equal to a fused q/k/v one; zero up columns are dropped per part."""
    down, up, alpha = module
    scale = module_scale(down, alpha)
    if up.shape[0] % 3:
        raise CheckpointError(f"fused in_proj LoRA up has {up.shape[0]} rows, not divisible by 3")
    parts = []
    for third in np.split(up, 3, axis=0):
        keep = np.flatnonzero(np.any(third != 0, axis=0))
        if keep.size == 0:
            keep = np.arange(down.shape[0])
        parts.append((down[keep], third[:, keep], scale * keep.size))
    return parts


def _join_qkv(parts: dict, source) -> Module:
    """One fused LoRA from ``{"q"|"k"|"v": (down, up, alpha)}`` (absent ones contribute zero rows): exact."""
    present = [parts[n] for n in _QKV if n in parts]
    d_out = {m[1].shape[0] for m in present}
    d_in = {m[0].shape[1] for m in present}
    if len(d_out) != 1 or len(d_in) != 1:
        raise _err(source, f"q/k/v LoRAs of one layer have different widths: out {d_out}, in {d_in}")
    (width,) = d_out
    scales = {module_scale(m[0], m[2]) for m in present}
    common = scales.pop() if len(scales) == 1 else None
    rank = sum(m[0].shape[0] for m in present)
    down = np.concatenate([m[0] for m in present], axis=0)
    up = np.zeros((3 * width, rank), dtype=np.result_type(*[m[1] for m in present]))
    col = 0
    for i, name in enumerate(_QKV):
        if name not in parts:
            continue
        d, u, a = parts[name]
        r = d.shape[0]
        up[i * width : (i + 1) * width, col : col + r] = u if common is not None else u * module_scale(d, a)
        col += r
    return down, up, (common * rank if common is not None else float(rank))


def _linear_pair(name: str, down: np.ndarray, up: np.ndarray, skip_conv: bool, source):
    """2-D factors of a linear or 1x1-conv LoRA; None (module skipped) or an error for a larger conv kernel."""
    if down.ndim == up.ndim == 2:
        return down, up
    if down.ndim == up.ndim == 4 and down.shape[2:] == up.shape[2:] == (1, 1):
        return down[:, :, 0, 0], up[:, :, 0, 0]
    if skip_conv:
        return None
    raise _err(
        source,
        f"{name}: LoRA factors down {down.shape}, up {up.shape} are not linear or 1x1 conv (conv "
        "LoRA / LoCon is not supported; pass skip_conv / --skip-conv to drop such modules)",
    )


def _exported_modules(adapter: Adapter, layout: UNetLayout, source) -> list:
    """(component, diffusers/HF module path, (down, up, alpha), is 1x1 conv) for export, fused in_proj split."""
    family = adapter.meta["family"]
    out = []
    for path, module in modules(adapter, source).items():
        if path.startswith(UNET_PREFIX):
            out.append(("unet", _unet_to_diffusers(path, layout), module, _is_conv1x1(path, family)))
            continue
        hf_paths = _te_to_hf(path, family)
        split = _split_fused(module) if len(hf_paths) == 3 else [module]
        out.extend(("text_encoder", p, m, False) for p, m in zip(hf_paths, split))
    return out


def _factors(module: Module, conv: bool, fold: bool):
    down, up, alpha = module
    if fold:
        up = (up.astype(np.float64) * module_scale(down, alpha)).astype(np.float32)
    if conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return np.ascontiguousarray(down), np.ascontiguousarray(up)


def _import_modules(found: dict, family: str, layout: UNetLayout, skip_conv: bool, source, label, alpha_of):
    """Our adapter from ``{(component, diffusers/HF module path): [down, up, alpha]}``; ``label(component, path)``
    names a module in errors, ``alpha_of(component, path, rank)`` gives the alpha of one without an alpha tensor."""
    mods, hf_qkv, skipped = {}, {}, []
    for (component, path), (down, up, alpha) in sorted(found.items()):
        name = label(component, path)
        if down is None or up is None:
            raise _err(source, f"{name} has no {'down' if down is None else 'up'} factor")
        pair = _linear_pair(name, np.asarray(down), np.asarray(up), skip_conv, source)
        if pair is None:
            skipped.append(name)
            continue
        down, up = pair
        if down.shape[0] != up.shape[1]:
            raise _err(source, f"{name}: rank mismatch: down {down.shape}, up {up.shape}")
        rank = down.shape[0]
        alpha = alpha_of(component, path, rank) if alpha is None else float(np.asarray(alpha, np.float32).reshape(()))
        module = (down, up, alpha)
        if component == "unet":
            mods[_unet_from_diffusers(path, layout)] = module
        elif (qkv := _HF_QKV.fullmatch(path)) is not None:
            hf_qkv.setdefault(qkv.group(1), {})[qkv.group(2)] = module
        else:
            mods[_te_from_hf(path, family)] = module
    if skipped:
        warnings.warn(
            f"{source}: dropped {len(skipped)} conv LoRA modules (skip_conv), e.g. {skipped[0]}", stacklevel=3
        )
    for layer, parts in hf_qkv.items():
        if family == "sd2":
            attn = _te_from_hf(f"{layer}.out_proj", family).rsplit(".", 1)[0]
            mods[f"{attn}.in_proj"] = _join_qkv(parts, source)
        else:
            for name, module in parts.items():
                mods[_te_from_hf(f"{layer}.{name}_proj", family)] = module
    if not mods:
        raise _err(source, "holds no LoRA modules")
    return make_adapter(mods, {"family": family})


# -------------------------------------------------------------------------------------------------------- diffusers

_DIFFUSERS_KEY = re.compile(
    r"(unet|text_encoder)\.(.+?)\.(?:(lora_A|lora\.down|lora_linear_layer\.down)\.weight"
    r"|(lora_B|lora\.up|lora_linear_layer\.up)\.weight|(alpha))"
)


def _peft_config(entries: list) -> dict:
    """PEFT ``LoraConfig`` kwargs for ``[(module path, rank, alpha)]``: most common r/alpha plus patterns."""
    rank = Counter(r for _, r, _ in entries).most_common(1)[0][0]
    alpha = Counter(a for _, _, a in entries).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{re.escape(p)}": r for p, r, _ in entries if r != rank},
        "alpha_pattern": {f"^{re.escape(p)}": a for p, _, a in entries if a != alpha},
        "target_modules": sorted(p for p, _, _ in entries),
    }


def to_diffusers(
    adapter: Adapter, layout: UNetLayout = UNetLayout(), fold_scale: bool = False, source="adapter"
) -> tuple:
    """``(state dict, safetensors metadata)`` in the diffusers/PEFT form ``unet.<path>.lora_A.weight`` etc."""
    state, entries = {}, {}
    for component, path, module, conv in _exported_modules(adapter, layout, source):
        down, up = _factors(module, conv, fold_scale)
        state[f"{component}.{path}.lora_A.weight"] = down
        state[f"{component}.{path}.lora_B.weight"] = up
        entries.setdefault(component, []).append((path, int(down.shape[0]), float(np.float32(module[2]))))
    metadata = {"format": "pt"}
    if not fold_scale:
        packed = {f"{c}.{k}": v for c, items in entries.items() for k, v in _peft_config(items).items()}
        metadata[PEFT_METADATA_KEY] = json.dumps(packed, sort_keys=True)
    return state, metadata


def _peft_alpha(config: dict, path: str, rank: int) -> float:
    """alpha of ``path`` under PEFT's rules (``alpha_pattern`` keys match a dotted suffix, as a regex)."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(value)
    return float(config.get("lora_alpha", rank))


def from_diffusers(
    state: dict,
    family: str,
    layout: UNetLayout = UNetLayout(),
    metadata: dict | None = None,
    skip_conv: bool = False,
    source="diffusers LoRA",
) -> Adapter:
    """Our adapter from a diffusers/PEFT LoRA state dict (``lora_A``/``lora_B``, ``lora.down``/``lora.up``,
    or ``lora_linear_layer.down``/``up``; legacy ``<module>.alpha`` keys optional)."""
    _check_family(family, source)
    try:
        peft_meta = json.loads((metadata or {}).get(PEFT_METADATA_KEY) or "{}")
    except ValueError as e:
        raise _err(source, f"metadata {PEFT_METADATA_KEY!r} is not JSON: {e}") from None
    configs = {
        c: {k[len(c) + 1 :]: v for k, v in peft_meta.items() if k.startswith(c + ".")} for c in ("unet", "text_encoder")
    }
    found: dict = {}
    for key, value in state.items():
        match = _DIFFUSERS_KEY.fullmatch(key)
        if match is None:
            raise _err(source, f"key {key!r} is not a diffusers/PEFT LoRA key (unet.* / text_encoder.*)")
        component, path, is_down, is_up, _ = match.groups()
        found.setdefault((component, path), [None, None, None])[0 if is_down else 1 if is_up else 2] = value
    return _import_modules(
        found, family, layout, skip_conv, source, lambda c, p: f"{c}.{p}", lambda c, p, r: _peft_alpha(configs[c], p, r)
    )


# ------------------------------------------------------------------------------------------------------------ kohya

_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA_KEY = re.compile(r"(lora_(?:unet|te)_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_TE = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(\w+)")
_HF_LAYER_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_BLOCK_LEAVES = {
    "layer": ("",),
    "resnet": ("conv1", "conv2", "time_emb_proj", "conv_shortcut"),
    "transformer": ("proj_in", "proj_out"),
}
_TRANSFORMER_BLOCK_LEAVES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)


def _kohya_name(component: str, path: str) -> str:
    return _KOHYA_PREFIX[component] + path.replace(".", "_")


def _kohya_unet_table(layout: UNetLayout) -> dict:
    """kohya name -> diffusers module path for every layer of the UNet layout (kohya builds it the same way, from
    the module list, because ``_`` -> ``.`` is ambiguous)."""
    table = {}
    for dpath, _, kind in unet_keys._block_table(**layout.key_args()):
        leaves = list(_BLOCK_LEAVES[kind])
        if kind == "transformer":
            leaves += [
                f"transformer_blocks.{d}.{leaf}"
                for d in range(layout.transformer_depth)
                for leaf in _TRANSFORMER_BLOCK_LEAVES
            ]
        for leaf in leaves:
            path = f"{dpath}.{leaf}" if leaf else dpath
            table[_kohya_name("unet", path)] = path
    return table


def _kohya_te_path(name: str) -> str | None:
    match = _KOHYA_TE.fullmatch(name)
    if match is None:
        return None
    leaves = {m.replace(".", "_"): m for m in _HF_LAYER_MODULES}
    leaf = leaves.get(match.group(2))
    return None if leaf is None else f"text_model.encoder.layers.{match.group(1)}.{leaf}"


def to_kohya(adapter: Adapter, layout: UNetLayout = UNetLayout(), source="adapter") -> tuple:
    """``(state dict, metadata)`` in kohya sd-scripts form, with an ``.alpha`` tensor for every module."""
    state = {}
    for component, path, module, conv in _exported_modules(adapter, layout, source):
        down, up = _factors(module, conv, False)
        name = _kohya_name(component, path)
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = np.asarray(module[2], dtype=np.float32)
    meta = adapter.meta
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(meta.get("rank")),
        "ss_network_alpha": str(meta.get("alpha")),
        "ss_v2": str(meta["family"] == "sd2"),
    }
    return state, metadata


def from_kohya(
    state: dict, family: str, layout: UNetLayout = UNetLayout(), skip_conv: bool = False, source="kohya LoRA"
) -> Adapter:
    """Our adapter from a kohya/A1111 LoRA (``lora_unet_*``/``lora_te_*``); names are resolved through a table of
    the known modules, never by guessing dots."""
    _check_family(family, source)
    unet_table = _kohya_unet_table(layout)
    found: dict = {}
    for key, value in state.items():
        match = _KOHYA_KEY.fullmatch(key)
        if match is None:
            raise _err(
                source,
                f"key {key!r} is not a kohya LoRA key (lora_unet_* / lora_te_* with .lora_down.weight, "
                ".lora_up.weight or .alpha)",
            )
        name, kind = match.groups()
        if name.startswith("lora_unet_"):
            target = ("unet", unet_table.get(name))
        else:
            target = ("text_encoder", _kohya_te_path(name))
        if target[1] is None:
            raise _err(source, f"key {key!r}: {name!r} is not a module of the {family} model/UNet layout given")
        slot = ("lora_down.weight", "lora_up.weight", "alpha").index(kind)
        found.setdefault(target, [None, None, None])[slot] = value
    return _import_modules(found, family, layout, skip_conv, source, _kohya_name, lambda c, p, r: float(r))


def detect_format(state: dict) -> str:
    """``"kohya"``, ``"diffusers"`` or ``"ldm"`` from the key names."""
    keys = list(state)
    if keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    if keys and all(k.startswith((UNET_PREFIX, TE_PREFIX)) for k in keys):
        return "ldm"
    raise CheckpointError(
        f"cannot tell the LoRA format from keys such as {keys[:1]} (expected lora_unet_*/lora_te_* "
        "(kohya), unet.*/text_encoder.* (diffusers) or model.diffusion_model.*/cond_stage_model.*)"
    )


# ------------------------------------------------------------------------------------------------------------ merges


def merge_into_base(base_state: dict, adapter: Adapter, weight: float = 1.0) -> dict:
    """A copy of ``base_state`` (full LDM keys) with ``W += weight * alpha / r * up @ down`` for every module; the
    fused SD2 ``in_proj`` delta goes to ``<attn>.in_proj_weight``. Arithmetic in float64, result in W's dtype."""
    out = dict(base_state)
    for path, module in modules(adapter).items():
        fused = _FUSED.fullmatch(path)
        key = f"{fused.group(1)}.in_proj_weight" if fused else path + ".weight"
        if key not in base_state:
            raise CheckpointError(
                f"base checkpoint has no key {key!r} for LoRA module {path!r} "
                f"(wrong family or model? adapter family {adapter.meta.get('family')!r})"
            )
        base = np.asarray(base_state[key])
        delta = weight * delta_weight(module)
        if delta.size != base.size or delta.shape != base.shape[:2]:
            raise CheckpointError(f"LoRA module {path!r}: delta shape {delta.shape} does not fit {key!r} {base.shape}")
        out[key] = (base.astype(np.float64) + delta.reshape(base.shape)).astype(base.dtype)
    return out


def _same_family(a: Adapter, b: Adapter) -> str:
    if a.meta.get("family") != b.meta.get("family"):
        raise CheckpointError(f"cannot combine a {a.meta.get('family')} adapter with a {b.meta.get('family')} one")
    return a.meta["family"]


def combine_lpl(a: Adapter, b: Adapter, w1: float = 1.0, w2: float = 1.0) -> Adapter:
    """cloneofsimo ``lpl``: ``up = w1 up_a + w2 up_b`` and ``down = w1 down_a + w2 down_b`` per module.

    Approximate: the delta is ``(w1 U_a + w2 U_b)(w1 D_a + w2 D_b)``, not ``w1 dW_a + w2 dW_b``. Both adapters need
    the same modules and ranks. Where their scales differ, ``alpha / r`` is first folded into each up (alpha = r).
    """
    _same_family(a, b)
    ma, mb = modules(a, "first adapter"), modules(b, "second adapter")
    if set(ma) != set(mb):
        only = sorted(set(ma) ^ set(mb))
        raise CheckpointError(f"lpl needs the same modules in both adapters; {len(only)} differ, e.g. {only[0]!r}")
    out = {}
    for path in ma:
        (da, ua, aa), (db, ub, ab) = ma[path], mb[path]
        if da.shape != db.shape or ua.shape != ub.shape:
            raise CheckpointError(
                f"lpl needs equal shapes/ranks; {path!r}: {da.shape}/{ua.shape} vs {db.shape}/{ub.shape}"
            )
        sa, sb = module_scale(da, aa), module_scale(db, ab)
        alpha = aa
        if sa != sb:
            ua, ub, alpha = ua * sa, ub * sb, float(da.shape[0])
        out[path] = (w1 * da.astype(np.float64) + w2 * db, w1 * ua.astype(np.float64) + w2 * ub, alpha)
    return make_adapter(out, a.meta)


def combine_svd(a: Adapter, b: Adapter, w1: float = 1.0, w2: float = 1.0, rank: int = 8) -> tuple:
    """``(adapter, SvdReport)``: per module the exact ``w1 dW_a + w2 dW_b`` (a module in one adapter only counts
    once) truncated to ``rank`` by SVD; ``up = U S``, ``down = Vh``, ``alpha = rank`` (scale 1). The report's errors
    are measured on the float32 factors written, relative to the exact float64 delta."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    _same_family(a, b)
    ma, mb = modules(a, "first adapter"), modules(b, "second adapter")
    out, errors = {}, {}
    total_res, total_ref = 0.0, 0.0
    for path in sorted(set(ma) | set(mb)):
        parts = [w * delta_weight(m[path]) for w, m in ((w1, ma), (w2, mb)) if path in m]
        if len({p.shape for p in parts}) != 1:
            raise CheckpointError(f"{path!r}: the adapters' deltas have different shapes {[p.shape for p in parts]}")
        delta = sum(parts)
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.size)
        up = (u[:, :r] * s[:r]).astype(np.float32)
        down = vh[:r].astype(np.float32)
        residual = np.linalg.norm(delta - up.astype(np.float64) @ down.astype(np.float64))
        reference = np.linalg.norm(delta)
        errors[path] = float(residual / reference) if reference > 0 else 0.0
        total_res += residual**2
        total_ref += reference**2
        out[path] = (down, up, float(r))
    overall = float(np.sqrt(total_res / total_ref)) if total_ref > 0 else 0.0
    return make_adapter(out, a.meta), SvdReport(errors, overall)


# --------------------------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2) instead of usage + message."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_layout(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("UNet layout (for the LDM <-> diffusers block map; defaults: SD 1.x/2.x)")
    g.add_argument(
        "--config",
        help="model YAML config; takes the layout (and family) from it instead of the options "
        "below, e.g. configs/tiny/sd2-tiny.yaml",
    )
    g.add_argument("--num-res-blocks", type=int, default=2, help="ResBlocks per level (default 2)")
    g.add_argument("--channel-mult", type=_int_list, default=(1, 2, 4, 4), help="channel multipliers (default 1,2,4,4)")
    g.add_argument(
        "--attention-resolutions",
        type=_int_list,
        default=(4, 2, 1),
        help="downsampling factors with attention (default 4,2,1)",
    )
    g.add_argument("--transformer-depth", type=int, default=1, help="transformer blocks per attention (default 1)")


def _layout_and_family(args) -> tuple:
    """(UNetLayout, family or None) from --config or the layout options."""
    if not args.config:
        return UNetLayout(
            args.num_res_blocks, args.channel_mult, args.attention_resolutions, args.transformer_depth
        ), None
    from ldm.util import load_config

    cfg = load_config(args.config)
    try:
        params = cfg.model.params
        unet = params.unet_config.params
        layout = UNetLayout(
            int(unet.num_res_blocks),
            tuple(unet.channel_mult),
            tuple(unet.attention_resolutions),
            int(unet.get("transformer_depth", 1)),
        )
        target = str(params.cond_stage_config.target)
    except Exception as e:  # OmegaConf raises several types for a missing node
        raise CheckpointError(f"{args.config}: not a model config with unet_config/cond_stage_config: {e}") from None
    family = "sd2" if target.endswith("OpenCLIPEmbedder") else "sd1" if target.endswith("CLIPEmbedder") else None
    return layout, family


def _check_out(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass --overwrite to replace it)")
    if path.suffix.lower() != ".safetensors" and path.suffix.lower() != ".ckpt":
        raise CheckpointError(f"{path}: output must end in .safetensors (or .ckpt for merge)")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ldm.lora_tools", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "export",
        help="our adapter -> diffusers/PEFT or kohya file",
        description="Write one of our LoRA adapters as a diffusers/PEFT or kohya .safetensors file.",
    )
    p.add_argument("src", help="our adapter (.safetensors with ldm_lora metadata)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument(
        "--format",
        choices=("diffusers", "kohya"),
        required=True,
        help="diffusers: unet.<path>.lora_A/lora_B (+ lora_adapter_metadata with alpha); kohya: "
        "lora_unet_*/lora_te_* with .alpha",
    )
    p.add_argument(
        "--fold-scale",
        action="store_true",
        help="diffusers only: multiply lora_B by alpha/r and write no PEFT metadata, for loaders that "
        "ignore lora_adapter_metadata",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    _add_layout(p)

    p = sub.add_parser(
        "import",
        help="diffusers/PEFT or kohya file -> our adapter",
        description="Convert a diffusers/PEFT or kohya LoRA .safetensors file to our adapter format.",
    )
    p.add_argument("src", help="diffusers/PEFT or kohya LoRA .safetensors")
    p.add_argument("dst", help="output .safetensors (our format)")
    p.add_argument(
        "--format",
        choices=("auto", "diffusers", "kohya"),
        default="auto",
        help="input format (default: detected from the key names)",
    )
    p.add_argument(
        "--family",
        choices=FAMILIES,
        help="sd1 or sd2 (text-encoder layout); default from --config or kohya's ss_v2 metadata",
    )
    p.add_argument("--context-dim", type=int, help="stored in the ldm_lora metadata")
    p.add_argument("--parameterization", choices=("eps", "v"), help="stored in the ldm_lora metadata")
    p.add_argument(
        "--skip-conv",
        action="store_true",
        help="drop conv LoRA modules (LoCon, kernels > 1x1) with a warning instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    _add_layout(p)

    p = sub.add_parser(
        "merge",
        help="fold an adapter into a full checkpoint",
        description="Write BASE with W += WEIGHT * alpha/r * up @ down for every LoRA module.",
    )
    p.add_argument("base", help="full checkpoint in our (original-LDM) names: .safetensors or .ckpt")
    p.add_argument("lora", help="our adapter")
    p.add_argument("out", help="output checkpoint (.safetensors or MindSpore .ckpt)")
    p.add_argument("--weight", type=float, default=1.0, help="strength multiplier (default 1.0)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a PyTorch pickle BASE with the restricted unpickler (only files you trust)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser(
        "combine",
        help="combine two adapters (svd: exact sum then truncated SVD; lpl: factor sum)",
        description="Combine two of our adapters into one.",
    )
    p.add_argument("a", help="first adapter")
    p.add_argument("b", help="second adapter")
    p.add_argument("out", help="output adapter .safetensors")
    p.add_argument(
        "--mode",
        choices=("svd", "lpl"),
        default="svd",
        help="svd: w1*dW_a + w2*dW_b truncated to --rank (error reported); lpl: cloneofsimo's weighted "
        "sum of ups and of downs (approximate, same ranks needed). Default svd",
    )
    p.add_argument("--w1", type=float, default=1.0, help="weight of the first adapter (default 1.0)")
    p.add_argument("--w2", type=float, default=1.0, help="weight of the second adapter (default 1.0)")
    p.add_argument("--rank", type=int, help="svd: rank of the result (default rank_a + rank_b: exact)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def _run(args) -> str:
    if args.command == "export":
        dst = _check_out(args.dst, args.overwrite)
        layout, family = _layout_and_family(args)
        adapter = read_adapter(args.src)
        if family is not None and family != adapter.meta["family"]:
            raise CheckpointError(
                f"{args.src}: adapter family {adapter.meta['family']!r} does not match {args.config} ({family})"
            )
        if args.format == "kohya":
            state, metadata = to_kohya(adapter, layout, args.src)
        else:
            state, metadata = to_diffusers(adapter, layout, args.fold_scale, args.src)
        write_state_dict(dst, state, metadata)
        return f"wrote {dst} ({args.format}, {len(state)} tensors)"
    if args.command == "import":
        dst = _check_out(args.dst, args.overwrite)
        layout, family = _layout_and_family(args)
        state = read_state_dict(args.src)
        metadata = read_metadata(args.src)
        fmt = detect_format(state) if args.format == "auto" else args.format
        if fmt == "ldm":
            raise CheckpointError(f"{args.src}: already uses our module names; nothing to import")
        family = args.family or family
        if family is None and "ss_v2" in metadata:
            family = "sd2" if metadata["ss_v2"] == "True" else "sd1"
        if family is None:
            raise CheckpointError(f"{args.src}: pass --family sd1|sd2 (or --config); the file does not say")
        if fmt == "kohya":
            adapter = from_kohya(state, family, layout, args.skip_conv, args.src)
        else:
            adapter = from_diffusers(state, family, layout, metadata, args.skip_conv, args.src)
        adapter.meta.update(context_dim=args.context_dim, parameterization=args.parameterization)
        write_adapter(dst, adapter)
        return f"wrote {dst} ({len(modules(adapter))} modules, family {family})"
    if args.command == "merge":
        out = _check_out(args.out, args.overwrite)
        adapter = read_adapter(args.lora)
        base = read_state_dict(args.base, allow_pickle=args.allow_pickle)
        metadata = read_metadata(args.base) if out.suffix.lower() == ".safetensors" else None
        write_state_dict(out, merge_into_base(base, adapter, args.weight), metadata or None)
        return f"wrote {out} ({len(modules(adapter))} modules merged, weight {args.weight})"
    out = _check_out(args.out, args.overwrite)
    a, b = read_adapter(args.a), read_adapter(args.b)
    if args.mode == "lpl":
        write_adapter(out, combine_lpl(a, b, args.w1, args.w2))
        return f"wrote {out} (lpl, w1={args.w1}, w2={args.w2}; approximate by construction)"
    rank = args.rank or max(m[0].shape[0] for m in modules(a).values()) + max(
        m[0].shape[0] for m in modules(b).values()
    )
    combined, report = combine_svd(a, b, args.w1, args.w2, rank)
    write_adapter(out, combined)
    worst = max(report.per_module.items(), key=lambda kv: kv[1])
    return (
        f"wrote {out} (svd rank {rank}); relative Frobenius error overall {report.overall:.3e}, "
        f"worst {worst[1]:.3e} ({worst[0]})"
    )


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # -h (0) or a one-line usage error (2), as a return value
        return int(exc.code or 0)
    try:
        message = _run(args)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
