"""Deprecated alias of :mod:`ldm.lora`, removed in ldm 0.2.0: ``python -m ldm.lora_tools`` runs ``python -m
ldm.lora`` and the former names import from their new modules (adapter, interop, merge). Both uses emit a
``DeprecationWarning`` saying so."""

import sys
import warnings

from ldm.lora.adapter import Adapter, delta_weight, make_adapter, modules, read_adapter, write_adapter
from ldm.lora.interop import UNetLayout, detect_format, from_diffusers, from_kohya, to_diffusers, to_kohya
from ldm.lora.merge import SvdReport, combine_lpl, combine_svd, merge_into_base

REMOVED_IN = "0.2.0"
DEPRECATION = (
    f"ldm.lora_tools is deprecated and will be removed in ldm {REMOVED_IN}: run python -m ldm.lora, and import from "
    "ldm.lora.adapter, ldm.lora.interop or ldm.lora.merge"
)
if __name__ != "__main__":
    warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)

__all__ = [
    "Adapter",
    "SvdReport",
    "UNetLayout",
    "combine_lpl",
    "combine_svd",
    "delta_weight",
    "detect_format",
    "from_diffusers",
    "from_kohya",
    "make_adapter",
    "main",
    "merge_into_base",
    "modules",
    "read_adapter",
    "to_diffusers",
    "to_kohya",
    "write_adapter",
]


def main(argv=None) -> int:
    """``python -m ldm.lora`` under its former name."""
    from ldm.lora.cli import main as lora_main

    warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)

    return lora_main(argv, prog="python -m ldm.lora_tools")


if __name__ == "__main__":
    sys.exit(main())
