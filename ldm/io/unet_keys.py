"""Key map between diffusers ``UNet2DConditionModel`` and original-LDM ``UNetModel`` state dicts.

Keys are relative to the UNet (no ``model.diffusion_model.`` prefix); values pass through untouched (no reshapes:
both schemes store the same tensors). The block layout comes from the UNet arguments, never from the keys: where an
upsampler sits (``output_blocks.k.1.conv`` or ``.2.conv``) depends on whether that level has attention, so the
caller states which levels do. Both directions are built from one table, so they are exact inverses.

Block map (``R = num_res_blocks``; level ``i`` of ``L``)::

    conv_in                          <-> input_blocks.0.0
    time_embedding.linear_1/_2       <-> time_embed.0/.2
    down_blocks.i.resnets.j          <-> input_blocks.(i*(R+1)+j+1).0     (.attentions.j <-> ....1)
    down_blocks.i.downsamplers.0.conv <-> input_blocks.((i+1)*(R+1)).0.op
    mid_block.resnets.0/attentions.0/resnets.1 <-> middle_block.0/1/2
    up_blocks.u.resnets.j            <-> output_blocks.(u*(R+1)+j).0      (.attentions.j <-> ....1)
    up_blocks.u.upsamplers.0.conv    <-> output_blocks.(u*(R+1)+R).{1|2}.conv
    conv_norm_out / conv_out         <-> out.0 / out.2
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

# diffusers ResnetBlock2D sub-layer -> LDM ResBlock sub-layer
_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_NAMES_INV = {v: k for k, v in _RESNET_NAMES.items()}

# Transformer2DModel / SpatialTransformer keys, identical in both schemes.
_TRANSFORMER_LEAF = re.compile(
    r"(?:(?:norm|proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2))\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.attn[12]\.to_[qkv]\.weight)"
)
_PARAM_LEAF = re.compile(r"weight|bias")

_LAYER, _RESNET, _TRANSFORMER = "layer", "resnet", "transformer"


def block_table(
    num_res_blocks: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int]
) -> List[Tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for every block of the UNet described by the arguments."""
    if num_res_blocks < 1 or not channel_mult:
        raise ValueError(f"need num_res_blocks >= 1 and a non-empty channel_mult, got {num_res_blocks}, {channel_mult}")
    levels = len(channel_mult)
    has_attn = [2**level in attention_resolutions for level in range(levels)]
    table = [
        ("conv_in", "input_blocks.0.0", _LAYER),
        ("time_embedding.linear_1", "time_embed.0", _LAYER),
        ("time_embedding.linear_2", "time_embed.2", _LAYER),
    ]
    k = 1
    for i in range(levels):
        for j in range(num_res_blocks):
            table.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _RESNET))
            if has_attn[i]:
                table.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", _TRANSFORMER))
            k += 1
        if i != levels - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op", _LAYER))
            k += 1
    table += [
        ("mid_block.resnets.0", "middle_block.0", _RESNET),
        ("mid_block.attentions.0", "middle_block.1", _TRANSFORMER),
        ("mid_block.resnets.1", "middle_block.2", _RESNET),
    ]
    k = 0
    for u in range(levels):
        level = levels - 1 - u
        for j in range(num_res_blocks + 1):
            table.append((f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0", _RESNET))
            if has_attn[level]:
                table.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", _TRANSFORMER))
            if level and j == num_res_blocks:
                index = 2 if has_attn[level] else 1
                table.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{k}.{index}.conv", _LAYER))
            k += 1
    table += [("conv_norm_out", "out.0", _LAYER), ("conv_out", "out.2", _LAYER)]
    return table


def _map_leaf(kind: str, leaf: str, names: Mapping[str, str]) -> str | None:
    """The leaf renamed for the other scheme, or None when it is not a parameter of a block of this kind."""
    if kind == _LAYER:
        return leaf if _PARAM_LEAF.fullmatch(leaf) else None
    if kind == _TRANSFORMER:
        return leaf if _TRANSFORMER_LEAF.fullmatch(leaf) else None
    layer, _, param = leaf.rpartition(".")
    if layer not in names or not _PARAM_LEAF.fullmatch(param):
        return None
    return f"{names[layer]}.{param}"


def _convert(
    state_dict: Mapping[str, np.ndarray], prefixes: Dict[str, Tuple[str, str]], names: Mapping[str, str], source: str
) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        new_key = None
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in prefixes:
                target, kind = prefixes[prefix]
                leaf = _map_leaf(kind, ".".join(parts[n:]), names)
                new_key = None if leaf is None else f"{target}.{leaf}"
                break
        if new_key is None:
            raise KeyError(f"{source} UNet key {key!r} is not part of the UNet layout given")
        out[new_key] = value
    return out


def diffusers_to_ldm(
    state_dict: Mapping[str, np.ndarray],
    num_res_blocks: int = 2,
    channel_mult: Sequence[int] = (1, 2, 4, 4),
    attention_resolutions: Sequence[int] = (4, 2, 1),
) -> Dict[str, np.ndarray]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM ``UNetModel`` keys.

    The layout arguments mean what they mean for ``UNetModel`` (defaults: SD 1.x and 2.x, which share one layout).
    Raises KeyError naming the first key that does not belong to that layout.
    """
    table = block_table(num_res_blocks, channel_mult, attention_resolutions)
    return _convert(state_dict, {d: (m, kind) for d, m, kind in table}, _RESNET_NAMES, "diffusers")


def ldm_to_diffusers(
    state_dict: Mapping[str, np.ndarray],
    num_res_blocks: int = 2,
    channel_mult: Sequence[int] = (1, 2, 4, 4),
    attention_resolutions: Sequence[int] = (4, 2, 1),
) -> Dict[str, np.ndarray]:
    """Inverse of :func:`diffusers_to_ldm`: LDM ``UNetModel`` keys to diffusers ``UNet2DConditionModel`` keys."""
    table = block_table(num_res_blocks, channel_mult, attention_resolutions)
    return _convert(state_dict, {m: (d, kind) for d, m, kind in table}, _RESNET_NAMES_INV, "LDM")
