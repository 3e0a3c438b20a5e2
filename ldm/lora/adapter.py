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

Variants (the metadata's ``lora_type`` names the one a file holds, :func:`variant_of`):

* LoCon: a convolution's LoRA. A 1x1 convolution's factors are stored 2-D like a Linear's; a larger kernel's
  ``lora_down.weight`` is ``[r, in, kh, kw]`` (the conv that reads the input) and its ``lora_up.weight`` ``[out, r]``
  (a 1x1 conv), so ``dW = alpha / r * up @ down.reshape(r, -1)`` reshaped to ``[out, in, kh, kw]``.
* DoRA: a LoRA module plus ``<module>.dora_scale`` ``[out]``, the magnitude ``m``; the adapted weight is
  ``m * (W + dW) / ||W + dW||`` with the norm taken per output row/channel (PEFT's ``lora_magnitude_vector``). It
  depends on the base weight, so it has no delta of its own (:func:`dora_weight`).
* LoHa and LoKr (LyCORIS): ``<module>.hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in*k*k]``, ``hada_w2_a``,
  ``hada_w2_b``: ``dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``; ``<module>.lokr_w1`` (or ``lokr_w1_a @
  lokr_w1_b``) and ``lokr_w2`` (or ``lokr_w2_a @ lokr_w2_b``, ``[b, d]`` or ``[b, d, kh, kw]``): ``dW = scale *
  kron(w1, w2)`` with LyCORIS' scale ``alpha / r`` (``r`` the width of ``lokr_w1_a``, else of ``lokr_w2_a``) and 1
  when neither factor is decomposed. Shapes are LyCORIS' own, so a conv delta is ``[out, in*k*k]`` until it meets
  the base weight (:func:`product_delta`).

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
MAGNITUDE = ".dora_scale"
PRODUCT_FACTORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
VARIANTS = ("lora", "locon", "dora", "loha", "lokr")
FUSED_IN_PROJ = "in_proj_lora"  # the attribute of an OpenCLIP attention cell that holds its fused q/k/v LoRA
_LEGACY_FUSED = re.compile(r"(.+\.attn)\.in_proj(\.lora_down\.weight|\.lora_up\.weight|\.alpha)")
_LEGACY_METADATA = "lora.format"


class Module(NamedTuple):
    """One LoRA module: ``dW = alpha / rank * up @ down``."""

    down: np.ndarray  # [rank, in]
    up: np.ndarray  # [out, rank]
    alpha: float


def delta_weight(down: np.ndarray, up: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha / rank * up @ down`` in float64: the weight change of one LoRA module (``[out, in, kh, kw]`` for a
    conv LoRA whose down is 4-D)."""
    rank = down.shape[0]
    flat = up.astype(np.float64).reshape(-1, rank) @ down.astype(np.float64).reshape(rank, -1)
    return float(alpha) / rank * flat.reshape((flat.shape[0],) + down.shape[1:])


def dora_factor(base: np.ndarray, delta: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """DoRA's ``m / ||W + dW||`` in float64, the norm per output row/channel, shaped to broadcast over ``base``
    (``delta`` already scaled, any shape of ``base``'s size)."""
    full = base.astype(np.float64) + delta.reshape(base.shape)
    norm = np.linalg.norm(full.reshape(full.shape[0], -1), axis=1)
    factor = magnitude.astype(np.float64).reshape(-1) / norm
    return factor.reshape((-1,) + (1,) * (full.ndim - 1))


def dora_weight(base: np.ndarray, delta: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """DoRA's adapted weight ``m * (W + dW) / ||W + dW||`` in float64 (see :func:`dora_factor`)."""
    return (base.astype(np.float64) + delta.reshape(base.shape)) * dora_factor(base, delta, magnitude)


def product_rank(kind: str, factors: dict) -> int | None:
    """The ``r`` of a LoHa/LoKr module's ``alpha / r`` (LoKr: width of ``lokr_w1_a``, else of ``lokr_w2_a``; None
    when neither LoKr factor is decomposed, which LyCORIS scales by 1)."""
    for key in ("hada_w1_a", "lokr_w1_a", "lokr_w2_a"):
        if key in factors:
            return int(factors[key].shape[1])
    return None


def product_scale(kind: str, factors: dict, alpha: float) -> float:
    """LyCORIS' scale of a LoHa/LoKr module: ``alpha / r``, and 1 for a LoKr with neither factor decomposed."""
    rank = product_rank(kind, factors)
    return 1.0 if rank is None else float(alpha) / rank


def _lokr_factor(factors: dict, name: str) -> np.ndarray:
    if name in factors:
        return factors[name].astype(np.float64)
    return factors[name + "_a"].astype(np.float64) @ factors[name + "_b"].astype(np.float64)


def product_delta(kind: str, factors: dict, alpha: float) -> np.ndarray:
    """The float64 weight change of a LoHa (Hadamard) or LoKr (Kronecker) module, in LyCORIS' shape."""
    scale = product_scale(kind, factors, alpha)
    if kind == "loha":
        f = {k: v.astype(np.float64) for k, v in factors.items()}
        return scale * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    w1, w2 = _lokr_factor(factors, "lokr_w1"), _lokr_factor(factors, "lokr_w2")
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return scale * np.kron(w1, w2)


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


_LORA_PARTS = (DOWN, UP, ALPHA, MAGNITUDE)
_PRODUCT_PARTS = tuple("." + name for names in PRODUCT_FACTORS.values() for name in names)


def _grouped(adapter: Adapter, source) -> dict:
    """``{module path: {part name: array}}`` (part names without the leading dot), every key accounted for."""
    parts: dict = {}
    for key, value in adapter.state.items():
        for suffix in _LORA_PARTS + _PRODUCT_PARTS:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[suffix[1:]] = np.asarray(value)
                break
        else:
            raise _err(
                source,
                f"key {key!r} is not a LoRA key (expected <module>{DOWN}, {UP}, {ALPHA}, {MAGNITUDE}, or LoHa/LoKr "
                "factors hada_w*/lokr_w*)",
            )
    return parts


def _kind(path: str, part: dict, source) -> str:
    kinds = {kind for kind, names in PRODUCT_FACTORS.items() if any(n in part for n in names)}
    if DOWN[1:] in part or UP[1:] in part:
        kinds.add("lora")
    if len(kinds) > 1:
        raise _err(source, f"module {path!r} mixes {' and '.join(sorted(kinds))} factors")
    if not kinds:
        raise _err(source, f"module {path!r} has {', '.join(sorted(part))} but no factors")
    return kinds.pop()


def _check_product(path: str, kind: str, part: dict, source) -> dict:
    """The factors of a LoHa/LoKr module after checking that they are complete and their shapes chain."""
    names = PRODUCT_FACTORS[kind]
    factors = {n: part[n] for n in names if n in part}
    if MAGNITUDE[1:] in part:
        raise _err(source, f"{path}: DoRA ({MAGNITUDE[1:]}) on a {kind} module is not supported")

    def pair(a: str, b: str) -> tuple:
        if a not in factors or b not in factors:
            missing = a if a not in factors else b
            raise _err(source, f"{path}: {kind} module has no {missing!r}")
        fa, fb = factors[a], factors[b]
        if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[0]:
            raise _err(source, f"{path}: {a} {fa.shape} and {b} {fb.shape} do not chain ([x, r] @ [r, y])")
        return fa.shape[0], fb.shape[1]

    if kind == "loha":
        if pair("hada_w1_a", "hada_w1_b") != pair("hada_w2_a", "hada_w2_b"):
            raise _err(source, f"{path}: the two Hadamard terms have different shapes")
        return factors
    for name in ("lokr_w1", "lokr_w2"):
        if name in factors and (name + "_a" in factors or name + "_b" in factors):
            raise _err(source, f"{path}: has both {name!r} and its decomposition {name}_a/_b")
        if name in factors:
            if factors[name].ndim not in (2, 4) or (name == "lokr_w1" and factors[name].ndim != 2):
                raise _err(source, f"{path}: {name} has shape {factors[name].shape}")
        else:
            pair(name + "_a", name + "_b")
    return factors


def _alpha_of(path: str, part: dict, default_alpha, rank: int, source) -> float:
    alpha = part.get(ALPHA[1:])
    if alpha is not None:
        if alpha.size != 1 or not np.isfinite(alpha).all():
            raise _err(source, f"key {path + ALPHA!r} must be one finite number, got shape {alpha.shape}")
        return float(alpha.reshape(()))
    return float(default_alpha) if default_alpha is not None else float(rank)


def parse(adapter: Adapter, source="adapter") -> tuple:
    """``(loras, magnitudes, products)`` of an adapter, checking keys, shapes, ranks and the family of the
    text-encoder names: ``{path: (down, up, alpha)}`` for LoRA/LoCon/DoRA modules, ``{path: m [out]}`` for the DoRA
    ones, ``{path: (kind, {factor name: array}, alpha)}`` for LoHa/LoKr ones."""
    family = check_family(adapter.meta.get("family"), f"{source} metadata")
    default_alpha = adapter.meta.get("alpha")
    loras, mags, products = {}, {}, {}
    for path, part in sorted(_grouped(adapter, source).items()):
        if not path.startswith((UNET_PREFIX, TEXT_PREFIX)):
            raise _err(source, f"module {path!r} is neither under {UNET_PREFIX!r} nor {TEXT_PREFIX!r}")
        if path.startswith(TEXT_PREFIX) and not path.startswith(TEXT_ROOTS[family]):
            raise _err(source, f"module {path!r} is not a {family} text-encoder name (expected {TEXT_ROOTS[family]}*)")
        kind = _kind(path, part, source)
        if kind != "lora":
            factors = _check_product(path, kind, part, source)
            rank = product_rank(kind, factors) or 1
            products[path] = (kind, factors, _alpha_of(path, part, default_alpha, rank, source))
            continue
        down, up = part.get(DOWN[1:]), part.get(UP[1:])
        if down is None or up is None:
            missing, have = (DOWN, UP) if down is None else (UP, DOWN)
            raise _err(source, f"key {path + have!r} has no matching {path + missing!r}")
        if down.ndim not in (2, 4) or up.ndim != 2:
            raise _err(
                source,
                f"{path}: LoRA factors must be down [r, in] or [r, in, kh, kw] and up [out, r], got down {down.shape}, "
                f"up {up.shape}",
            )
        if down.shape[0] != up.shape[1]:
            raise _err(
                source,
                f"{path}: rank mismatch: {path + DOWN} has rank {down.shape[0]}, {path + UP} has rank {up.shape[1]}",
            )
        loras[path] = Module(down, up, _alpha_of(path, part, default_alpha, down.shape[0], source))
        magnitude = part.get(MAGNITUDE[1:])
        if magnitude is not None:
            if magnitude.size != up.shape[0] or not np.isfinite(magnitude).all():
                raise _err(
                    source, f"key {path + MAGNITUDE!r} must hold {up.shape[0]} finite numbers, got {magnitude.shape}"
                )
            mags[path] = magnitude.reshape(-1)
    if not (loras or products):
        raise _err(source, "holds no LoRA modules")
    return loras, mags, products


def modules(adapter: Adapter, source="adapter") -> dict:
    """``{module path: (down, up, alpha)}`` of the LoRA-factored modules (LoRA, LoCon, DoRA's low-rank part), after
    checking the whole adapter (:func:`parse`)."""
    return parse(adapter, source)[0]


def variant_of(loras: dict, magnitudes: dict, products: dict) -> str:
    """The ``lora_type`` of a set of modules: ``dora``, ``loha``, ``lokr``, ``locon`` (a conv kernel > 1x1),
    ``lora``, or the kinds joined with ``+`` when they mix."""
    kinds = {kind for kind, _, _ in products.values()}
    if loras:
        kinds.add("dora" if magnitudes else "locon" if any(m[0].ndim == 4 for m in loras.values()) else "lora")
    return "+".join(sorted(kinds))


def target_of(path: str) -> str:
    """The dotted suffix naming the layer inside its block (``attn1.to_q``, ``self_attn.q_proj``,
    ``attn.in_proj_lora``)."""
    match = re.search(r"(?:transformer_blocks|layers|resblocks)\.\d+\.(.+)$", path)
    if match:
        return match.group(1)
    return path.rsplit(".", 1)[-1]


def make_adapter(mods: dict, meta: dict, magnitudes: dict | None = None, products: dict | None = None) -> Adapter:
    """An :class:`Adapter` from ``{module: (down, up, alpha)}`` (plus DoRA ``{module: magnitude}`` and LoHa/LoKr
    ``{module: (kind, factors, alpha)}``); every module gets an ``.alpha`` tensor and the metadata's ``rank``/
    ``alpha``/``targets``/``lora_type`` are recomputed (most common rank and alpha)."""
    magnitudes, products = magnitudes or {}, products or {}
    state = {}
    for path, (down, up, alpha) in sorted(mods.items()):
        state[path + DOWN] = np.ascontiguousarray(down, dtype=np.float32)
        state[path + UP] = np.ascontiguousarray(up, dtype=np.float32)
        state[path + ALPHA] = np.asarray(alpha, dtype=np.float32)
    for path, magnitude in sorted(magnitudes.items()):
        state[path + MAGNITUDE] = np.ascontiguousarray(magnitude, dtype=np.float32).reshape(-1)
    for path, (_, factors, alpha) in sorted(products.items()):
        for name, array in factors.items():
            state[f"{path}.{name}"] = np.ascontiguousarray(array, dtype=np.float32)
        state[path + ALPHA] = np.asarray(alpha, dtype=np.float32)
    ranks = Counter(int(down.shape[0]) for down, _, _ in mods.values())
    alphas = Counter(float(np.float32(alpha)) for _, _, alpha in mods.values())
    meta = {
        "family": meta.get("family"),
        "context_dim": meta.get("context_dim"),
        "parameterization": meta.get("parameterization"),
        "rank": ranks.most_common(1)[0][0] if ranks else None,
        "alpha": alphas.most_common(1)[0][0] if alphas else None,
        "targets": sorted({target_of(p) for p in (*mods, *products)}),
        "lora_type": variant_of(mods, magnitudes, products),
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
