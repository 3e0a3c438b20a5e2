"""Read a LoRA adapter in any format this package knows: ours, diffusers/PEFT or kohya ``.safetensors``, or a PEFT
(run) folder. ``python -m ldm.lora import`` converts with it, and training starts from one (``init_lora_weights``)."""

from __future__ import annotations

from pathlib import Path

from ldm.io.checkpoint import CheckpointError, read_metadata, read_state_dict
from ldm.lora.adapter import Adapter, read_adapter
from ldm.lora.interop import UNetLayout, detect_format, from_diffusers, from_kohya
from ldm.lora.peft_folder import is_peft_folder, read_peft_folder

FORMATS = ("auto", "diffusers", "kohya", "peft")


def read_any_adapter(
    src, family: str | None, layout: UNetLayout, fmt: str = "auto", skip_conv: bool = False
) -> tuple[Adapter, str]:
    """``(adapter, format read)``; ``fmt="auto"`` takes peft for a folder, else the format the key names show
    (``"ldm"``: already ours). ``family`` (sd1/sd2) may be None when the file says it (ours, kohya's ``ss_v2``)."""
    folder = fmt == "peft" or (fmt == "auto" and Path(src).is_dir())
    if folder and not is_peft_folder(src):
        raise CheckpointError(f"{src}: not a PEFT folder (no adapter_config.json here, in unet/ or in text_encoder/)")
    state = {} if folder else read_state_dict(src)
    metadata = {} if folder else read_metadata(src)
    fmt = "peft" if folder else detect_format(state) if fmt == "auto" else fmt
    if fmt == "ldm":
        return read_adapter(src), fmt
    if family is None and "ss_v2" in metadata:
        family = "sd2" if metadata["ss_v2"] == "True" else "sd1"
    if family is None:
        raise CheckpointError(f"{src}: pass --family sd1|sd2 (or --config); the file does not say")
    if fmt == "peft":
        return read_peft_folder(src, family, layout, skip_conv), fmt
    if fmt == "kohya":
        return from_kohya(state, family, layout, skip_conv, src), fmt
    return from_diffusers(state, family, layout, metadata, skip_conv, src), fmt
