"""A tiny random diffusers Stable Diffusion folder shaped like ``ldm/configs/tiny/sd{1,2}-tiny.yaml`` (reference
side)."""

from __future__ import annotations

import torch


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (norms and zero-initialised convs too) so no mapping error can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def build_components(family: str = "sd2", seed: int = 0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 2,
        cross_attention_dim=32,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, seed + i)
        m.eval()
    return unet, vae, text


def save_folder(path, family: str = "sd2", prediction_type: str = "epsilon", seed: int = 0):
    """Write the tiny components as a diffusers pipeline folder (weights + configs + scheduler)."""
    from diffusers import DDIMScheduler

    unet, vae, text = build_components(family, seed)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text.save_pretrained(path / "text_encoder")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(path / "scheduler")
    return unet, vae, text
