"""LoRA adapters <-> the PyTorch world: diffusers/PEFT and kohya files, module-name maps and the fused q/k/v split.

Scale conventions (``dW`` is preserved exactly, i.e. the factors are copied bit for bit):

* Text-encoder names: transformers >= 5 builds ``CLIPTextModel`` without its ``text_model.`` level, and the installed
  diffusers/peft match LoRA names against the loaded model, so diffusers and PEFT exports write
  ``text_encoder.encoder.layers.N...`` (and patterns that match either spelling). Imports accept both spellings
  (older transformers and kohya-converted files keep ``text_model.``). kohya files always use ``lora_te_text_model_``.
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
  the up blocks (alpha = rank). Three parts with one shared down and scale (what export writes) join back at rank r,
  so export followed by import gives the trainer's own parameter shapes.

Convolutions (LoCon): a 1x1 conv's LoRA (SD1 ``proj_in``/``proj_out``, ResBlock shortcuts: ``[r, in, 1, 1]``) is
stored squeezed to 2-D and re-expanded on export (and on merge, to the base weight's shape); a larger kernel keeps its
``[r, in, kh, kw]`` down and stores its ``[out, r, 1, 1]`` up as ``[out, r]``. ``skip_conv`` drops kernels > 1x1.

Other variants: DoRA magnitudes (kohya/LyCORIS ``dora_scale`` ``[out, 1]``, PEFT/diffusers ``lora_magnitude_vector``
``[out]`` or ``[1, out, 1, 1]``) are read and written flat (a fused SD2 q/k/v magnitude splits into thirds, as the
row norms do); LoHa/LoKr factors keep LyCORIS' names and shapes. A file of another LyCORIS algorithm (GLoRA, (IA)^3,
OFT/BOFT, full diff, norms, Tucker factors) is refused with its name.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ldm.io import text_encoder_keys, unet_keys
from ldm.io.checkpoint import CheckpointError
from ldm.lora.adapter import (
    FUSED_IN_PROJ,
    PRODUCT_FACTORS,
    Adapter,
    Module,
    make_adapter,
    module_scale,
    parse,
    product_rank,
)
from ldm.names import TEXT_PREFIX, UNET_PREFIX, check_family

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_FUSED = re.compile(rf"(.+\.attn)\.{FUSED_IN_PROJ}")
_QKV = ("q", "k", "v")
_HF_QKV = re.compile(r"(text_model\.encoder\.layers\.\d+\.self_attn)\.([qkv])_proj")
HF_TEXT_ROOT = "text_model."  # the CLIPTextModel level that transformers >= 5 no longer has
_CONV1X1 = re.compile(r"proj_in|proj_out")
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
PRODUCT_PARTS = tuple(n for names in PRODUCT_FACTORS.values() for n in names)
_UNSUPPORTED = {  # a module part -> the LyCORIS algorithm (or feature) whose files carry it
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "GLoRA"),
    **dict.fromkeys(("on_input", "weight"), "(IA)^3"),
    **dict.fromkeys(("oft_blocks", "oft_diag", "rescale", "oft_R", "boft_m"), "OFT/BOFT"),
    **dict.fromkeys(("diff", "diff_b"), "full (native fine-tuning diff)"),
    **dict.fromkeys(("w_norm", "b_norm"), "norm"),
    "lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)",
    **dict.fromkeys(("hada_t1", "hada_t2"), "LoHa with Tucker decomposition (hada_t1/hada_t2)"),
    "lokr_t2": "LoKr with Tucker decomposition (lokr_t2)",
}


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

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        """The layout of a model config's UNet."""
        from ldm.names import model_node

        unet = model_node(config)["params"]["unet_config"]["params"]
        return cls(
            int(unet["num_res_blocks"]),
            tuple(unet["channel_mult"]),
            tuple(unet["attention_resolutions"]),
            int(unet.get("transformer_depth", 1)),
        )


def _err(source, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


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
    rel = path[len(TEXT_PREFIX) :]
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
    return TEXT_PREFIX + key[: -len(".weight")]


def hf_text_path(path: str) -> str:
    """A CLIP text-encoder module path in the ``text_model.`` spelling (older transformers, kohya) whichever of the
    two spellings it comes in (transformers >= 5 names modules ``encoder.layers.N...`` directly)."""
    return path if path.startswith(HF_TEXT_ROOT) else HF_TEXT_ROOT + path


def installed_text_path(path: str) -> str:
    """The module path the installed transformers (>= 5) gives a CLIP text-encoder module: no ``text_model.``."""
    return path[len(HF_TEXT_ROOT) :] if path.startswith(HF_TEXT_ROOT) else path


def _is_conv(path: str, family: str, down: np.ndarray) -> bool:
    """A convolution in the reference UNet: a kernel > 1x1 (4-D down), a ResBlock's 1x1 ``skip_connection`` or SD1's
    transformer ``proj_in``/``proj_out`` (SD2 uses Linear)."""
    if down.ndim == 4 or not path.startswith(UNET_PREFIX):
        return down.ndim == 4
    leaf = path.rsplit(".", 1)[-1]
    return leaf == "skip_connection" or (family == "sd1" and _CONV1X1.fullmatch(leaf) is not None)


def unsupported_part(part: str, key: str, source) -> CheckpointError:
    """The error for a key whose module part is not one of ours: the LyCORIS algorithm's name when it is known."""
    algorithm = _UNSUPPORTED.get(part)
    if algorithm is not None:
        return _err(
            source,
            f"key {key!r}: LyCORIS algorithm {algorithm} is not supported (supported: LoRA/LoCon, LoHa, LoKr, DoRA)",
        )
    return _err(source, f"key {key!r}: {part!r} is not a LoRA/LoCon, DoRA, LoHa or LoKr part")


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
        parts.append(Module(down[keep], third[:, keep], scale * keep.size))
    return parts


def _join_qkv(parts: dict, source) -> Module:
    """One fused LoRA from ``{"q"|"k"|"v": (down, up, alpha)}`` (absent ones contribute zero rows): exact. When all
    three share one down and one scale (a fused LoRA split on export), the join keeps that rank: ups stacked."""
    present = [parts[n] for n in _QKV if n in parts]
    first = present[0]
    first_scale = module_scale(first.down, first.alpha)
    if len(present) == 3 and all(
        np.array_equal(m.down, first.down) and module_scale(m.down, m.alpha) == first_scale for m in present
    ):
        return Module(first.down, np.concatenate([m.up for m in present], axis=0), first.alpha)
    d_out = {m.up.shape[0] for m in present}
    d_in = {m.down.shape[1] for m in present}
    if len(d_out) != 1 or len(d_in) != 1:
        raise _err(source, f"q/k/v LoRAs of one layer have different widths: out {d_out}, in {d_in}")
    (width,) = d_out
    scales = {module_scale(m.down, m.alpha) for m in present}
    common = scales.pop() if len(scales) == 1 else None
    rank = sum(m.down.shape[0] for m in present)
    down = np.concatenate([m.down for m in present], axis=0)
    up = np.zeros((3 * width, rank), dtype=np.result_type(*[m.up for m in present]))
    col = 0
    for i, name in enumerate(_QKV):
        if name not in parts:
            continue
        d, u, a = parts[name]
        r = d.shape[0]
        up[i * width : (i + 1) * width, col : col + r] = u if common is not None else u * module_scale(d, a)
        col += r
    return Module(down, up, common * rank if common is not None else float(rank))


def _lora_factors(name: str, down: np.ndarray, up: np.ndarray, skip_conv: bool, source):
    """Our factors of a linear or conv LoRA (1x1 squeezed to 2-D, up always 2-D); None (module skipped) for a kernel
    larger than 1x1 with ``skip_conv``."""
    if down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim not in (2, 4) or up.ndim != 2:
        raise _err(source, f"{name}: LoRA factors down {down.shape}, up {up.shape} are not linear or conv factors")
    if down.ndim == 4 and skip_conv:
        return None
    if down.shape[0] != up.shape[1]:
        raise _err(source, f"{name}: rank mismatch: down {down.shape}, up {up.shape}")
    return down, up


def _magnitude(name: str, value, out: int, source) -> np.ndarray:
    """A DoRA magnitude per output row/channel: kohya/LyCORIS ``[out, 1(, 1, 1)]``, PEFT ``[out]``/``[1, out, 1, 1]``;
    LyCORIS' per-input-column variant (``wd_on_out=False``, ``[1, in]``) is refused."""
    value = np.asarray(value)
    if value.size != out or (value.ndim >= 2 and value.shape[0] != out and value.shape[1] != out):
        raise _err(
            source,
            f"{name}: DoRA magnitude of shape {value.shape} is not one per output channel ({out}); per-input "
            "decomposition (LyCORIS wd_on_out=False) is not supported",
        )
    return value.reshape(-1)


@dataclass
class Imported:
    """One module read from a file: a LoRA ``(down, up, alpha)`` with an optional DoRA magnitude, or a LoHa/LoKr
    ``(kind, factors, alpha)`` (``lora`` None)."""

    lora: tuple | None = None
    magnitude: np.ndarray | None = None
    product: tuple | None = None


def _read_module(name: str, parts: dict, skip_conv: bool, source, alpha_of) -> Imported | None:
    """An :class:`Imported` from ``{part: array}`` (our part names); ``alpha_of(rank)`` gives a missing alpha."""
    kinds = {kind for kind, names in PRODUCT_FACTORS.items() if any(n in parts for n in names)}
    if len(kinds) > 1 or (kinds and ("lora_down.weight" in parts or "lora_up.weight" in parts)):
        raise _err(source, f"{name} mixes factors of several kinds: {', '.join(sorted(parts))}")
    alpha = parts.get("alpha")
    if kinds:
        kind = kinds.pop()
        if "dora_scale" in parts:
            raise _err(source, f"{name}: DoRA (dora_scale) on a {kind} module is not supported")
        factors = {n: np.asarray(parts[n]) for n in PRODUCT_FACTORS[kind] if n in parts}
        rank = product_rank(kind, factors)
        alpha = alpha_of(rank) if alpha is None else float(np.asarray(alpha, np.float32).reshape(()))
        return Imported(product=(kind, factors, alpha))
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        raise _err(source, f"{name} has no {'down' if down is None else 'up'} factor")
    pair = _lora_factors(name, np.asarray(down), np.asarray(up), skip_conv, source)
    if pair is None:
        return None
    down, up = pair
    alpha = alpha_of(down.shape[0]) if alpha is None else float(np.asarray(alpha, np.float32).reshape(()))
    magnitude = parts.get("dora_scale")
    if magnitude is not None:
        magnitude = _magnitude(name, magnitude, up.shape[0], source)
    return Imported(lora=Module(down, up, alpha), magnitude=magnitude)


def exported_modules(adapter: Adapter, layout: UNetLayout, source, with_products: bool = False) -> list:
    """(component, diffusers/HF module path, (down, up, alpha), is conv, DoRA magnitude or None) for export of the
    LoRA-factored modules, fused in_proj split; LoHa/LoKr modules are refused unless ``with_products`` (the caller
    writes them itself)."""
    family = adapter.meta["family"]
    loras, magnitudes, products = parse(adapter, source)
    if products and not with_products:
        path, (kind, _, _) = next(iter(products.items()))
        raise _err(source, f"{path}: {kind} modules export only to the kohya/LyCORIS format (--format kohya)")
    out = []
    for path, module in loras.items():
        magnitude = magnitudes.get(path)
        if path.startswith(UNET_PREFIX):
            conv = _is_conv(path, family, module[0])
            out.append(("unet", _unet_to_diffusers(path, layout), module, conv, magnitude))
            continue
        hf_paths = _te_to_hf(path, family)
        if len(hf_paths) == 3:
            thirds = np.split(magnitude, 3) if magnitude is not None else [None] * 3
            out.extend(("text_encoder", p, m, False, g) for p, m, g in zip(hf_paths, _split_fused(module), thirds))
        else:
            out.append(("text_encoder", hf_paths[0], module, False, magnitude))
    return out


def lora_factors(module: Module, conv: bool, fold: bool):
    down, up, alpha = module
    if fold:
        up = (up.astype(np.float64) * module_scale(down, alpha)).astype(np.float32)
    if conv:
        down = down if down.ndim == 4 else down[:, :, None, None]
        up = up[:, :, None, None]
    return np.ascontiguousarray(down), np.ascontiguousarray(up)


def import_modules(found: dict, family: str, layout: UNetLayout, skip_conv: bool, source, label, alpha_of):
    """Our adapter from ``{(component, diffusers/HF module path): {part: array}}`` (part names as in our adapter:
    ``lora_down.weight``, ``lora_up.weight``, ``alpha``, ``dora_scale``, ``hada_*``, ``lokr_*``); ``label(component,
    path)`` names a module in errors, ``alpha_of(component, path, rank)`` gives the alpha of one without an alpha
    tensor (``rank`` None for a LoKr with neither factor decomposed)."""
    mods, magnitudes, products, hf_qkv, skipped = {}, {}, {}, {}, []
    for (component, path), parts in sorted(found.items()):
        name = label(component, path)
        item = _read_module(name, parts, skip_conv, source, functools.partial(alpha_of, component, path))
        if item is None:
            skipped.append(name)
            continue
        if component == "unet":
            ours = _unet_from_diffusers(path, layout)
        elif (qkv := _HF_QKV.fullmatch(hf_text_path(path))) is not None and family == "sd2":
            if item.product is not None:
                kind = item.product[0]
                raise _err(source, f"{name}: {kind} on SD2's q/k/v (one fused in_proj here) is not supported")
            hf_qkv.setdefault(qkv.group(1), {})[qkv.group(2)] = item
            continue
        else:
            ours = _te_from_hf(hf_text_path(path), family)
        if item.product is not None:
            products[ours] = item.product
            continue
        mods[ours] = item.lora
        if item.magnitude is not None:
            magnitudes[ours] = item.magnitude
    if skipped:
        warnings.warn(
            f"{source}: dropped {len(skipped)} conv LoRA modules (skip_conv), e.g. {skipped[0]}", stacklevel=3
        )
    for layer, parts in hf_qkv.items():
        attn = _te_from_hf(f"{layer}.out_proj", family).rsplit(".", 1)[0]
        fused = f"{attn}.{FUSED_IN_PROJ}"
        mods[fused] = _join_qkv({n: item.lora for n, item in parts.items()}, source)
        with_dora = [n for n in _QKV if n in parts and parts[n].magnitude is not None]
        if with_dora and with_dora != list(_QKV):
            raise _err(source, f"{layer}: DoRA on SD2's q/k/v needs all three of q, k and v (found {with_dora})")
        if with_dora:
            magnitudes[fused] = np.concatenate([parts[n].magnitude for n in _QKV])
    if not (mods or products):
        raise _err(source, "holds no LoRA modules")
    return make_adapter(mods, {"family": family}, magnitudes, products)


# -------------------------------------------------------------------------------------------------------- diffusers

_DIFFUSERS_KEY = re.compile(
    r"(unet|text_encoder)\.(.+?)\.(?:(lora_A|lora\.down|lora_linear_layer\.down)\.weight"
    r"|(lora_B|lora\.up|lora_linear_layer\.up)\.weight|(alpha)|(lora_magnitude_vector)(?:\.weight)?)"
)
MAGNITUDE_KEY = "lora_magnitude_vector"  # PEFT's and diffusers' name of DoRA's magnitude


def peft_config(entries: list, use_dora: bool = False) -> dict:
    """PEFT ``LoraConfig`` kwargs for ``[(module path, rank, alpha)]``: most common r/alpha plus patterns. A pattern
    is the escaped full path, which PEFT matches as a dotted suffix (so it also matches under a ``text_model.``)."""
    rank = Counter(r for _, r, _ in entries).most_common(1)[0][0]
    alpha = Counter(a for _, _, a in entries).most_common(1)[0][0]
    return {
        "use_dora": use_dora,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(p): r for p, r, _ in entries if r != rank},
        "alpha_pattern": {re.escape(p): a for p, _, a in entries if a != alpha},
        "target_modules": sorted(p for p, _, _ in entries),
    }


def to_diffusers(
    adapter: Adapter, layout: UNetLayout = UNetLayout(), fold_scale: bool = False, source="adapter"
) -> tuple:
    """``(state dict, safetensors metadata)`` in the diffusers/PEFT form ``unet.<path>.lora_A.weight`` etc."""
    state, entries = {}, {}
    dora = False
    for component, path, module, conv, magnitude in exported_modules(adapter, layout, source):
        down, up = lora_factors(module, conv, fold_scale)
        path = installed_text_path(path) if component == "text_encoder" else path
        state[f"{component}.{path}.lora_A.weight"] = down
        state[f"{component}.{path}.lora_B.weight"] = up
        if magnitude is not None:
            if fold_scale:
                raise _err(source, "--fold_scale cannot keep DoRA exact (its norm needs the scale); export without it")
            # diffusers hands text-encoder keys to transformers' loader, which maps ``.weight`` (PEFT's own save
            # strips it, and that loader then drops the magnitude); the UNet keys go through PEFT, which adds it
            suffix = ".weight" if component == "text_encoder" else ""
            state[f"{component}.{path}.{MAGNITUDE_KEY}{suffix}"] = peft_magnitude(magnitude, conv)
            dora = True
        entries.setdefault(component, []).append((path, int(down.shape[0]), float(np.float32(module.alpha))))
    metadata = {"format": "pt"}
    if not fold_scale:
        packed = {f"{c}.{k}": v for c, items in entries.items() for k, v in peft_config(items, use_dora=dora).items()}
        metadata[PEFT_METADATA_KEY] = json.dumps(packed, sort_keys=True)
    return state, metadata


def peft_magnitude(magnitude: np.ndarray, conv: bool) -> np.ndarray:
    """PEFT's shape of a DoRA magnitude: ``[out]`` for a Linear, ``[1, out, 1, 1]`` for a Conv2d."""
    magnitude = np.ascontiguousarray(magnitude, dtype=np.float32)
    return magnitude.reshape(1, -1, 1, 1) if conv else magnitude


def peft_pattern_value(patterns: dict, path: str, default):
    """The value of the first of PEFT's ``rank_pattern``/``alpha_pattern`` keys matching ``path`` (a regex matched
    against a dotted suffix, as PEFT does), else ``default``."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        except re.error as e:
            raise CheckpointError(f"LoRA pattern {pattern!r} is not a regular expression: {e}") from None
    return default


def _peft_alpha(config: dict, path: str, rank: int) -> float:
    """alpha of ``path`` under PEFT's rules."""
    return float(peft_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", rank)))


def from_diffusers(
    state: dict,
    family: str,
    layout: UNetLayout = UNetLayout(),
    metadata: dict | None = None,
    skip_conv: bool = False,
    source="diffusers LoRA",
) -> Adapter:
    """Our adapter from a diffusers/PEFT LoRA state dict (``lora_A``/``lora_B``, ``lora.down``/``lora.up``,
    or ``lora_linear_layer.down``/``up``; legacy ``<module>.alpha`` keys optional; DoRA's ``lora_magnitude_vector``)."""
    check_family(family, source)
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
        component, path, is_down, is_up, is_alpha, _ = match.groups()
        part = "lora_down.weight" if is_down else "lora_up.weight" if is_up else "alpha" if is_alpha else "dora_scale"
        found.setdefault((component, path), {})[part] = value
    return import_modules(
        found, family, layout, skip_conv, source, lambda c, p: f"{c}.{p}", lambda c, p, r: _peft_alpha(configs[c], p, r)
    )


# ------------------------------------------------------------------------------------------------------------ kohya

_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA_KEY = re.compile(r"(lora_(?:unet|te)_[A-Za-z0-9_]+)\.(.+)")
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
    for dpath, _, kind in unet_keys.block_table(**layout.key_args()):
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
    """``(state dict, metadata)`` in kohya sd-scripts form, with an ``.alpha`` tensor for every module; LoHa/LoKr
    modules keep LyCORIS' factor names (``hada_w1_a``..., ``lokr_w1``...)."""
    _, magnitudes, products = parse(adapter, source)
    if magnitudes:
        raise _err(
            source,
            "DoRA adapters export to --format diffusers or peft (diffusers' kohya loader drops dora_scale for SD1/SD2)",
        )
    state = {}
    for component, path, module, conv, _ in exported_modules(adapter, layout, source, with_products=True):
        down, up = lora_factors(module, conv, False)
        name = _kohya_name(component, path)
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = np.asarray(module.alpha, dtype=np.float32)
    family = adapter.meta["family"]
    for path, (_, factors, alpha) in products.items():
        if path.startswith(UNET_PREFIX):
            name = _kohya_name("unet", _unet_to_diffusers(path, layout))
        else:
            (hf_path,) = _te_to_hf(path, family)
            name = _kohya_name("text_encoder", hf_text_path(hf_path))
        state.update({f"{name}.{factor}": np.ascontiguousarray(a) for factor, a in factors.items()})
        state[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    meta = adapter.meta
    metadata = {
        "ss_network_module": "networks.lora" if not products else "lycoris.kohya",
        "ss_network_dim": str(meta.get("rank")),
        "ss_network_alpha": str(meta.get("alpha")),
        "ss_v2": str(meta["family"] == "sd2"),
    }
    if products:
        metadata["ss_network_args"] = json.dumps({"algo": meta.get("lora_type")})
    return state, metadata


def from_kohya(
    state: dict, family: str, layout: UNetLayout = UNetLayout(), skip_conv: bool = False, source="kohya LoRA"
) -> Adapter:
    """Our adapter from a kohya/A1111/LyCORIS file (``lora_unet_*``/``lora_te_*``: LoRA/LoCon, ``dora_scale``, LoHa,
    LoKr); names are resolved through a table of the known modules, never by guessing dots."""
    check_family(family, source)
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
        name, part = match.groups()
        if part not in LORA_PARTS + PRODUCT_PARTS:
            raise unsupported_part(part, key, source)
        if name.startswith("lora_unet_"):
            target = ("unet", unet_table.get(name))
        else:
            target = ("text_encoder", _kohya_te_path(name))
        if target[1] is None:
            raise _err(source, f"key {key!r}: {name!r} is not a module of the {family} model/UNet layout given")
        found.setdefault(target, {})[part] = value
    return import_modules(
        found, family, layout, skip_conv, source, _kohya_name, lambda c, p, r: float(r) if r is not None else 1.0
    )


def detect_format(state: dict) -> str:
    """``"kohya"``, ``"diffusers"`` or ``"ldm"`` from the key names."""
    keys = list(state)
    if keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    if keys and all(k.startswith((UNET_PREFIX, TEXT_PREFIX)) for k in keys):
        return "ldm"
    raise CheckpointError(
        f"cannot tell the LoRA format from keys such as {keys[:1]} (expected lora_unet_*/lora_te_* "
        "(kohya), unet.*/text_encoder.* (diffusers) or model.diffusion_model.*/cond_stage_model.*)"
    )
