"""Precision policy: which dtype each network computes and stores its weights in, and the loss scaling it implies.

One place decides it for training and generation (``--precision fp32|fp16|bf16``, mindone's ``use_fp16`` alias,
``--vae_precision``, ``--text_encoder_precision``):

- Dense/Conv layers of the UNet, VAE and text encoder compute in their network's dtype (set through the model
  config's ``dtype`` argument, so the cast is part of the network as it is built). GroupNorm/LayerNorm and the
  attention softmax always run in float32 (``ldm.models.layers``, ``ldm.models.attention``).
- Frozen Dense/Conv weights of a low-precision network are *stored* in that dtype (half their memory); trainable
  parameters (LoRA, or the whole UNet in full fine-tuning) stay float32 masters and are cast for compute.
- The VAE defaults to float32 when the UNet is fp16 (its decoder overflows in fp16 on real weights, as diffusers'
  ``force_upcast`` records); the text encoder follows the UNet.
- Loss scaling defaults to dynamic for fp16 and none for bf16/fp32.

fp32 everywhere leaves the config and the weights untouched, so the fp32 path is exactly what it was.
This module imports MindSpore only inside the functions that touch tensors, so the option parser can use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

PRECISIONS = ("fp32", "fp16", "bf16")
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_LOSS_SCALER = {"fp32": "none", "fp16": "dynamic", "bf16": "none"}


class PrecisionError(ValueError):
    """A precision setting that cannot be used (unknown name, conflicting alias, kernels missing on the device)."""


@dataclass(frozen=True)
class PrecisionPolicy:
    """Compute dtype (``fp32``/``fp16``/``bf16``) of each network."""

    unet: str = "fp32"
    vae: str = "fp32"
    text_encoder: str = "fp32"

    @property
    def is_fp32(self) -> bool:
        return self.unet == self.vae == self.text_encoder == "fp32"

    @property
    def uses(self) -> set:
        return {self.unet, self.vae, self.text_encoder}

    def describe(self) -> str:
        return f"UNet {self.unet}, VAE {self.vae}, text encoder {self.text_encoder}"


def _check(name: str, value: str) -> str:
    if value not in PRECISIONS:
        raise PrecisionError(f"{name} {value!r} is not a precision; choose from {', '.join(PRECISIONS)}")
    return value


def unet_precision(precision: str | None, use_fp16: bool = False) -> str:
    """The UNet precision of ``--precision`` and mindone's alias ``--use_fp16``, the same rule for training and
    generation: ``--use_fp16 True`` means fp16 and goes only with ``--precision`` unset or fp16; any other
    ``--precision`` beside it is one error naming both (neither silently wins). Unset (None or "") means fp32."""
    if use_fp16 and precision not in (None, "", "fp16"):
        raise PrecisionError(f"--use_fp16 True conflicts with --precision {precision}; give only one of them")
    return "fp16" if use_fp16 else _check("precision", precision or "fp32")


def resolve_policy(
    precision: str | None = None,
    vae_precision: str | None = None,
    text_encoder_precision: str | None = None,
    use_fp16: bool = False,
) -> PrecisionPolicy:
    """The policy of ``--precision`` and ``--use_fp16`` (:func:`unet_precision`) with the per-network overrides;
    an empty/None override takes the default: the VAE stays fp32 under an fp16 UNet and follows it otherwise, the
    text encoder follows the UNet."""
    precision = unet_precision(precision, use_fp16)
    vae = _check("vae_precision", vae_precision) if vae_precision else ("fp32" if precision == "fp16" else precision)
    text = _check("text_encoder_precision", text_encoder_precision) if text_encoder_precision else precision
    return PrecisionPolicy(unet=precision, vae=vae, text_encoder=text)


def default_loss_scaler(policy: PrecisionPolicy) -> str:
    """Dynamic loss scaling when the UNet (the differentiated network) runs in fp16, none otherwise."""
    return DEFAULT_LOSS_SCALER[policy.unet]


def config_with_policy(config, policy: PrecisionPolicy):
    """A copy of a model config (full config or its ``model`` node) whose three networks get the policy's ``dtype``;
    the config itself when the policy is all fp32 (so the fp32 build is the unchanged one)."""
    if policy.is_fp32:
        return config
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else copy.deepcopy(config)
    node = plain["model"] if "model" in plain else plain
    params = node["params"]
    for key, precision in (
        ("unet_config", policy.unet),
        ("first_stage_config", policy.vae),
        ("cond_stage_config", policy.text_encoder),
    ):
        params[key].setdefault("params", {})["dtype"] = DTYPE_NAMES[precision]
    return plain


def store_frozen_weights_low(model, policy: PrecisionPolicy) -> int:
    """Store every frozen Dense/Conv weight (and the OpenCLIP fused ``in_proj``) of a low-precision network in that
    network's dtype; trainable parameters stay float32 masters. Call after loading weights and choosing the
    trainable set (LoRA injection). Returns the bytes saved."""
    import mindspore as ms

    dtypes = {"fp16": ms.float16, "bf16": ms.bfloat16}
    saved = 0
    for net, precision in (
        (model.model, policy.unet),
        (model.first_stage_model, policy.vae),
        (model.cond_stage_model, policy.text_encoder),
    ):
        if precision == "fp32":
            continue
        for _, cell in net.cells_and_names():
            for param in _compute_weights(cell):
                if not param.requires_grad and param.dtype == ms.float32:
                    saved += param.size * 2
                    param.set_dtype(dtypes[precision])
    return saved


def _compute_weights(cell) -> list:
    """The parameters ``cell`` itself feeds to a matmul/convolution: a Dense/Conv's weight and bias, a LoRA-wrapped
    Dense or Conv2d frozen base weight and bias (not its adapter), an OpenCLIP attention's fused ``in_proj``."""
    from mindspore import nn

    from ldm.lora.layers import LoRAWrapper

    own = cell.get_parameters(expand=False)
    if isinstance(cell, (nn.Dense, nn.Conv2d)):
        return list(own)
    if isinstance(cell, LoRAWrapper):
        return [p for p in own if p is cell.weight or (cell.has_bias and p is cell.bias)]
    if hasattr(cell, "in_proj_weight"):
        return [p for p in own if p.name.split(".")[-1].startswith("in_proj_")]
    return []


def check_device_supports(policy: PrecisionPolicy) -> None:
    """Raise :class:`PrecisionError` when the current device has no bf16 matmul/conv kernels (MindSpore's CPU
    backend): a bf16 run would otherwise fail deep inside the first graph."""
    if "bf16" not in policy.uses:
        return
    reason = bf16_unsupported_reason()
    if reason:
        raise PrecisionError(f"bf16 is not available here: {reason}; use --precision fp16 or fp32")


def bf16_unsupported_reason() -> str:
    """Empty when a bf16 matmul runs on the current device target, else why not (the kernel error's first line)."""
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    a = ms.Tensor(np.ones((2, 2), np.float32)).astype(ms.bfloat16)
    try:
        ops.matmul(a, a).astype(ms.float32).asnumpy()
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{ms.get_context('device_target')} bf16 MatMul kernel missing ({first})"
    return ""


def configure_attention(unet, enable_flash_attention: bool, warn=None) -> bool:
    """Switch the UNet's attention to the Ascend flash kernel when asked and available; elsewhere print one warning
    line and keep the standard path. Returns whether flash attention is on."""
    from ldm.models.attention import CrossAttention, use_flash_attention

    if not enable_flash_attention:
        return False
    on = use_flash_attention(True)
    if not on:
        import mindspore as ms

        message = (
            f"enable_flash_attention needs Ascend (device target is {ms.get_context('device_target')}); "
            "using the standard attention"
        )
        (warn or _stderr)(message)
    for _, cell in unet.cells_and_names():
        if isinstance(cell, CrossAttention):
            cell.use_flash = on
    return on


def _stderr(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)
