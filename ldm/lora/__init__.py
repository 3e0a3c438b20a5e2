"""Low-rank adapters (LoRA): layers, whole-network injection, the adapter file, interop, merges and a CLI.

Modules, in import order (each may import the ones before it):

- :mod:`ldm.lora.targets`: target patterns and presets (plain Python);
- :mod:`ldm.lora.adapter`: the adapter file format, the one owner of its names and metadata (NumPy only);
- :mod:`ldm.lora.layers`: ``LoRADense`` and the fused OpenCLIP ``in_proj`` delta, merge/unmerge on the layer;
- :mod:`ldm.lora.network`: inject, freeze, adapters in (``load_adapter``) and out (``to_adapter``), merge/scale all;
- :mod:`ldm.lora.interop`: diffusers/PEFT and kohya files;
- :mod:`ldm.lora.peft_folder`: PEFT ``save_pretrained`` folders;
- :mod:`ldm.lora.merge`: merge into base weights, combine adapters, apply adapters for generation;
- :mod:`ldm.lora.cli`: ``python -m ldm.lora``.

Names are resolved lazily, so ``import ldm.lora.adapter`` (and the CLI) does not start MindSpore.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "targets": ("TEXT_ENCODER_TARGETS", "UNET_ATTENTION_TARGETS", "UNET_EXTENDED_TARGETS", "UNET_TARGET_PRESETS"),
    "adapter": ("Adapter", "delta_weight", "make_adapter", "modules", "read_adapter", "write_adapter"),
    "layers": ("LoRADense", "LoRAFusedInProj", "LoRALayer"),
    "network": (
        "count_lora_parameters",
        "inject_lora",
        "load_adapter",
        "load_lora_state_dict",
        "lora_layers",
        "lora_modules",
        "lora_state_dict",
        "merge_all",
        "set_lora_scale",
        "to_adapter",
        "unmerge_all",
    ),
    "interop": ("UNetLayout", "detect_format", "from_diffusers", "from_kohya", "to_diffusers", "to_kohya"),
    "peft_folder": ("read_peft_folder", "write_peft_folder"),
    "merge": ("SvdReport", "apply_adapters", "combine_lpl", "combine_svd", "merge_into_base"),
}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_OWNER)


def __getattr__(name: str):
    if name not in _OWNER:
        raise AttributeError(f"module 'ldm.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ldm.lora.{_OWNER[name]}"), name)
