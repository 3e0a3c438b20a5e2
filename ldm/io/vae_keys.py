"""Key map between diffusers ``AutoencoderKL`` state dicts and our original-LDM VAE names.

Keys are relative to the VAE (no ``first_stage_model.`` prefix); values are numpy arrays. Differences handled:
diffusers numbers the decoder's ``up_blocks`` from the lowest resolution (LDM's ``up.{n-1}``) up, calls
``nin_shortcut``/``norm_out`` ``conv_shortcut``/``conv_norm_out``, and its mid-block attention holds Linear
weights ``[C, C]`` (``to_q``/``to_k``/``to_v``/``to_out.0``, formerly ``query``/``key``/``value``/``proj_attn``,
still read) where LDM has 1x1 convs ``[C, C, 1, 1]``. The layout (levels, resnets per level) comes from the
caller, never from the keys: a layout that disagrees with the keys yields unknown keys (KeyError) or, for too many
levels, decoder keys that a strict load reports as missing/unexpected, never a silently permuted decoder.
"""

from __future__ import annotations

import numpy as np

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_LEGACY = {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}  # 1x1 convs in LDM
_LEAVES = ("weight", "bias")


def _module_pairs(num_levels: int, num_res_blocks: int) -> list[tuple[str, str]]:
    """(ldm_module, diffusers_module) for every parameterised module of the VAE."""
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]

    def resnet(ldm: str, diff: str) -> None:
        pairs.extend((f"{ldm}.{a}", f"{diff}.{b}") for a, b in _RESNET.items())

    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out")]
        pairs.append((f"{part}.norm_out", f"{part}.conv_norm_out"))
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        pairs.extend((f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in _ATTN.items())
    for i in range(num_levels):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < num_levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        k = num_levels - 1 - i
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}")
        if i > 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    return pairs


def _check_layout(num_levels: int, num_res_blocks: int) -> None:
    if num_levels < 1 or num_res_blocks < 1:
        raise ValueError(f"need num_levels >= 1 and num_res_blocks >= 1, got {num_levels} and {num_res_blocks}")


def _is_attn_proj(ldm_module: str) -> bool:
    return ".mid.attn_1." in ldm_module and ldm_module.rsplit(".", 1)[1] in _ATTN_LEGACY


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    if leaf not in _LEAVES:
        raise KeyError(f"unknown VAE key {key!r}: expected a '.weight' or '.bias' parameter")
    return module, leaf


def diffusers_to_ldm(
    state_dict: dict[str, np.ndarray], *, num_levels: int, num_res_blocks: int
) -> dict[str, np.ndarray]:
    """diffusers ``AutoencoderKL`` keys -> ours. num_levels = len(block_out_channels) = len(ch_mult);
    num_res_blocks = layers_per_block. Unknown keys raise KeyError naming the key."""
    _check_layout(num_levels, num_res_blocks)
    to_ldm = {}
    for ldm, diff in _module_pairs(num_levels, num_res_blocks):
        to_ldm[diff] = ldm
        if _is_attn_proj(ldm):
            part, name = ldm.split(".", 1)[0], ldm.rsplit(".", 1)[1]
            to_ldm[f"{part}.mid_block.attentions.0.{_ATTN_LEGACY[name]}"] = ldm
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        module, leaf = _split(key)
        if module not in to_ldm:
            raise KeyError(f"unknown diffusers VAE key {key!r} for {num_levels} levels x {num_res_blocks} resnets")
        new_key = f"{to_ldm[module]}.{leaf}"
        if new_key in out:
            raise KeyError(f"diffusers VAE keys {source[new_key]!r} and {key!r} both map to {new_key!r}")
        if leaf == "weight" and _is_attn_proj(to_ldm[module]):
            value = value.reshape(value.shape[0], value.shape[1], 1, 1)
        out[new_key] = value
        source[new_key] = key
    return out


def ldm_to_diffusers(
    state_dict: dict[str, np.ndarray], *, num_levels: int, num_res_blocks: int
) -> dict[str, np.ndarray]:
    """Our keys -> current diffusers ``AutoencoderKL`` keys (exact inverse of :func:`diffusers_to_ldm` on
    current-name input). Unknown keys raise KeyError naming the key."""
    _check_layout(num_levels, num_res_blocks)
    to_diffusers = dict(_module_pairs(num_levels, num_res_blocks))
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        module, leaf = _split(key)
        if module not in to_diffusers:
            raise KeyError(f"unknown LDM VAE key {key!r} for {num_levels} levels x {num_res_blocks} resnets")
        if leaf == "weight" and _is_attn_proj(module):
            value = value.reshape(value.shape[0], value.shape[1])
        out[f"{to_diffusers[module]}.{leaf}"] = value
    return out
