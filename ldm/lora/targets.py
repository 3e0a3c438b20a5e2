"""LoRA target patterns (dotted path suffixes of the adapted layers) and the trainer's named presets.

Plain Python, so option parsing can validate ``lora_targets`` before MindSpore is imported.
"""

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_EXTENDED_TARGETS = UNET_ATTENTION_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = (
    "self_attn.q_proj",  # SD1, HF CLIP names
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "attn.in_proj",  # SD2, OpenCLIP fused q/k/v (see ldm.lora.layers.LoRAFusedInProj)
    "attn.out_proj",
)
UNET_TARGET_PRESETS = {"attention": UNET_ATTENTION_TARGETS, "extended": UNET_EXTENDED_TARGETS}
# LoCon (kohya's conv_dim): the 3x3 convs of ResBlocks, Downsample and Upsample take conv_rank/conv_alpha, and the
# ResBlocks' Linear and 1x1 conv (time embedding, shortcut) the LoRA rank, as kohya's networks.lora adds them.
UNET_CONV3X3_TARGETS = ("in_layers.2", "out_layers.3", "op", "conv")
UNET_RESBLOCK_TARGETS = ("emb_layers.1", "skip_connection")
LORA_TYPES = ("lora", "dora")
