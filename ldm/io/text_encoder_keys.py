"""Text-encoder key maps between transformers/diffusers ``CLIPTextModel`` names and ours.

Our keys are relative to ``cond_stage_model`` (original-LDM names):

* SD1 (``family="sd1"``): ``transformer.`` + the transformers name (``transformer.text_model.encoder.layers.0...``).
* SD2 (``family="sd2"``): open_clip names under ``model.`` with fused attention input projections:
  ``model.transformer.resblocks.{i}.attn.in_proj_weight`` = concat(q, k, v) along the output axis.

transformers keys are those of a diffusers ``text_encoder/`` folder (``text_model.*``); input may also use the
unprefixed names (``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``) that transformers>=5 keeps in memory and
writes with ``save_pretrained``, while output always has the prefix, which every transformers version loads.

Some of those files, and SD1 Stability checkpoints, also hold the ``position_ids`` buffer; it is a constant
``arange(77)``, not a parameter, and is dropped explicitly. A Stability SD2 checkpoint holds all 24 OpenCLIP ViT-H/14
blocks plus ``text_projection`` and ``logit_scale``; SD2 uses the penultimate block's output, so we build 23 blocks
(as diffusers and mindone do) and :func:`checkpoint_ignored_keys` lists what import drops. Unknown keys raise KeyError
naming them.
"""

from __future__ import annotations

import re

import numpy as np

from ldm.names import check_family

HF_POSITION_IDS = "text_model.embeddings.position_ids"
OPENCLIP_BLOCK_PARAMS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)

_HF_LAYER = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\."
    r"(self_attn\.(?:q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)
_OC_LAYER = re.compile(r"model\.transformer\.resblocks\.(\d+)\.(.+)")
# transformers name <-> open_clip name, outside the blocks and (without the layer prefix) inside them.
_TOP = {
    "text_model.embeddings.token_embedding.weight": "model.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "model.positional_embedding",
    "text_model.final_layer_norm.weight": "model.ln_final.weight",
    "text_model.final_layer_norm.bias": "model.ln_final.bias",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK = {
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_QKV = ("q", "k", "v")
_HF_ROOTS = ("embeddings", "encoder", "final_layer_norm")


def _hf_prefixed(key: str) -> str:
    return key if key.startswith("text_model.") or key.split(".")[0] not in _HF_ROOTS else "text_model." + key


def _is_hf_key(key: str) -> bool:
    return key in _TOP or _HF_LAYER.fullmatch(key) is not None


def _unknown(key: str, family: str) -> KeyError:
    return KeyError(f"unknown {family} text-encoder key {key!r}")


def diffusers_to_ldm(state_dict: dict[str, np.ndarray], family: str = "sd1") -> dict[str, np.ndarray]:
    """transformers ``CLIPTextModel`` keys (``text_model.*`` or unprefixed) -> ours, relative to
    ``cond_stage_model``."""
    check_family(family)
    out, qkv, seen = {}, {}, set()
    for name, value in state_dict.items():
        key = _hf_prefixed(name)
        if key in seen:
            raise KeyError(f"{name!r} appears both with and without the 'text_model.' prefix")
        seen.add(key)
        if key == HF_POSITION_IDS:
            continue
        if not _is_hf_key(key):
            raise _unknown(name, family)
        if family == "sd1":
            out["transformer." + key] = value
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        layer, module, kind = _HF_LAYER.fullmatch(key).groups()
        prefix = f"model.transformer.resblocks.{layer}."
        if module in _BLOCK:
            out[f"{prefix}{_BLOCK[module]}.{kind}"] = value
        else:  # self_attn.{q,k,v}_proj
            qkv.setdefault((layer, kind), {})[module[len("self_attn.")]] = value
    for (layer, kind), parts in qkv.items():
        for name in _QKV:
            if name not in parts:
                raise KeyError(f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind} is missing")
        fused = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"model.transformer.resblocks.{layer}.attn.{fused}"] = np.concatenate([parts[n] for n in _QKV], axis=0)
    return out


def ldm_to_diffusers(state_dict: dict[str, np.ndarray], family: str = "sd1") -> dict[str, np.ndarray]:
    """Ours (relative to ``cond_stage_model``) -> transformers ``CLIPTextModel`` keys; inverse of
    :func:`diffusers_to_ldm`."""
    check_family(family)
    out = {}
    for key, value in state_dict.items():
        if family == "sd1":
            hf_key = key[len("transformer.") :]
            if not key.startswith("transformer.") or not _is_hf_key(hf_key):
                raise _unknown(key, family)
            out[hf_key] = value
            continue
        if key in _TOP_INV:
            out[_TOP_INV[key]] = value
            continue
        match = _OC_LAYER.fullmatch(key)
        if match is None or match.group(2) not in OPENCLIP_BLOCK_PARAMS:
            raise _unknown(key, family)
        layer, name = match.groups()
        prefix = f"text_model.encoder.layers.{layer}."
        module, kind = name.rsplit(".", 1)
        if module in _BLOCK_INV:
            out[f"{prefix}{_BLOCK_INV[module]}.{kind}"] = value
            continue
        kind = "weight" if kind == "in_proj_weight" else "bias"
        if value.shape[0] % 3:
            raise ValueError(f"{key}: first dimension {value.shape[0]} is not divisible by 3 (q, k, v)")
        for part, piece in zip(_QKV, np.split(value, 3, axis=0)):
            out[f"{prefix}self_attn.{part}_proj.{kind}"] = piece
    return out


def checkpoint_ignored_keys(family: str, layers: int = 23) -> tuple[str, ...]:
    """Keys of a Stability checkpoint's ``cond_stage_model`` that import drops: SD1's ``position_ids`` buffer; for
    SD2 (``layers`` = blocks we build) ``text_projection``, ``logit_scale`` and block ``layers`` (the last one)."""
    check_family(family)
    if family == "sd1":
        return ("transformer." + HF_POSITION_IDS,)
    block = f"model.transformer.resblocks.{layers}."
    return ("model.text_projection", "model.logit_scale", *(block + p for p in OPENCLIP_BLOCK_PARAMS))


def checkpoint_to_ldm(state_dict: dict[str, np.ndarray], family: str, layers: int = 23) -> dict[str, np.ndarray]:
    """Stability checkpoint ``cond_stage_model`` keys (prefix already stripped) -> ours: identity minus
    :func:`checkpoint_ignored_keys`. Keys must be ours or ignored; SD2 blocks past block ``layers`` are unknown."""
    ignored = set(checkpoint_ignored_keys(family, layers))
    out = {}
    for key, value in state_dict.items():
        if key in ignored:
            continue
        if family == "sd1":
            known = key.startswith("transformer.") and _is_hf_key(key[len("transformer.") :])
        else:
            match = _OC_LAYER.fullmatch(key)
            known = key in _TOP_INV or (
                match is not None and int(match.group(1)) < layers and match.group(2) in OPENCLIP_BLOCK_PARAMS
            )
        if not known:
            raise _unknown(key, family)
        out[key] = value
    return out
