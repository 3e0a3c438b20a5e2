"""CLIP ViT (image and text towers with projections) for CLIP score, with transformers ``CLIPModel`` names.

Parameters: ``vision_model.{embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight},
pre_layrnorm, encoder.layers.{i}.*, post_layernorm}``, ``text_model.*`` (``ldm.models.text_encoders
.CLIPTextTransformer``), ``visual_projection.weight``, ``text_projection.weight``, ``logit_scale``, so a Hugging Face
``model.safetensors`` loads by identity (the ``position_ids`` buffers of older files are ignored). The vision tower
is pre-LN like the text tower but attends without a mask and pools the class token through ``post_layernorm``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from ldm.io.loading import load_state_dict_into
from ldm.models.layers import Embedding, LayerNorm, Linear
from ldm.models.text_encoders import CLIPEncoder, CLIPTextTransformer


@dataclass(frozen=True)
class CLIPConfig:
    """Tower sizes; the defaults are ViT-B/16 (``openai/clip-vit-base-patch16``)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    vocab_size: int = 49408
    max_positions: int = 77
    projection_dim: int = 512
    act: str = "quick_gelu"
    eps: float = 1e-5
    eos_token_id: int = 49407
    image_mean: tuple = field(default=(0.48145466, 0.4578275, 0.40821073))
    image_std: tuple = field(default=(0.26862954, 0.26130258, 0.27577711))

    @classmethod
    def from_hf(cls, config: dict) -> CLIPConfig:
        """From a transformers ``CLIPConfig`` dict (``config.json`` of a Hugging Face CLIP model)."""
        t, v = config["text_config"], config["vision_config"]
        return cls(
            image_size=v.get("image_size", 224),
            patch_size=v["patch_size"],
            vision_width=v["hidden_size"],
            vision_layers=v["num_hidden_layers"],
            vision_heads=v["num_attention_heads"],
            vision_mlp=v["intermediate_size"],
            text_width=t["hidden_size"],
            text_layers=t["num_hidden_layers"],
            text_heads=t["num_attention_heads"],
            text_mlp=t["intermediate_size"],
            vocab_size=t.get("vocab_size", 49408),
            max_positions=t.get("max_position_embeddings", 77),
            projection_dim=config.get("projection_dim", 512),
            act=t.get("hidden_act", "quick_gelu"),
            eps=t.get("layer_norm_eps", 1e-5),
            eos_token_id=t.get("eos_token_id", 49407),
        )


PRESETS = {
    "vit-b-16": CLIPConfig(),
    "vit-b-32": CLIPConfig(patch_size=32),
    "vit-l-14": CLIPConfig(
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        vision_mlp=4096,
        text_width=768,
        text_heads=12,
        text_mlp=3072,
        projection_dim=768,
    ),
}
HF_NAMES = {
    "vit-b-16": "openai/clip-vit-base-patch16",
    "vit-b-32": "openai/clip-vit-base-patch32",
    "vit-l-14": "openai/clip-vit-large-patch14",
}
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def load_config(name_or_dir: str) -> CLIPConfig:
    """A preset name (``vit-b-16``/``vit-b-32``/``vit-l-14``) or a folder / file holding a HF ``config.json``."""
    if name_or_dir.lower() in PRESETS:
        return PRESETS[name_or_dir.lower()]
    path = os.path.join(name_or_dir, "config.json") if os.path.isdir(name_or_dir) else name_or_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name_or_dir}: not a CLIP preset ({', '.join(PRESETS)}) nor a config.json")
    with open(path) as f:
        return CLIPConfig.from_hf(json.load(f))


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.class_embedding = Parameter(
            initializer(Normal(0.02), (cfg.vision_width,), ms.float32), name="class_embedding"
        )
        self.patch_embedding = nn.Conv2d(
            3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size, pad_mode="valid", has_bias=False
        )
        self.position_embedding = Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.vision_width)

    def construct(self, pixels):
        patches = self.patch_embedding(pixels)
        b, w = patches.shape[0], patches.shape[1]
        patches = patches.reshape(b, w, -1).transpose(0, 2, 1)
        cls = self.class_embedding.reshape(1, 1, w).broadcast_to((b, 1, w))
        return ops.cat((cls, patches), 1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Cell):
    """pixels [B, 3, S, S] (normalised) -> pooled class token [B, width] after ``post_layernorm``."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.vision_width, cfg.eps)  # transformers' spelling
        self.encoder = CLIPEncoder(
            cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp, cfg.act, cfg.eps
        )
        self.post_layernorm = LayerNorm(cfg.vision_width, cfg.eps)
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.no_mask = ms.Tensor(np.zeros((n, n), np.float32))

    def construct(self, pixels):
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), self.no_mask)
        return self.post_layernorm(hidden[:, 0])


class CLIPModel(nn.Cell):
    """Both towers and projections; ``image_embeds``/``text_embeds`` return unnormalised projected features."""

    def __init__(self, cfg: CLIPConfig = PRESETS["vit-b-16"]):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.text_model = CLIPTextTransformer(
            vocab_size=cfg.vocab_size,
            width=cfg.text_width,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            max_positions=cfg.max_positions,
            act=cfg.act,
            eps=cfg.eps,
            mlp_dim=cfg.text_mlp,
            eos_token_id=cfg.eos_token_id,
        )
        self.visual_projection = Linear(cfg.vision_width, cfg.projection_dim, bias=False)
        self.text_projection = Linear(cfg.text_width, cfg.projection_dim, bias=False)
        self.logit_scale = Parameter(ms.Tensor(np.log(1 / 0.07), ms.float32), name="logit_scale")

    def image_embeds(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def text_embeds(self, ids):
        return self.text_projection(self.text_model(ids)[1])

    def construct(self, pixels, ids):
        return self.image_embeds(pixels), self.text_embeds(ids)


def load_clip_state_dict(model: CLIPModel, state_dict: dict[str, np.ndarray], source: str = "<memory>") -> None:
    """Copy a transformers-named state dict into ``model``; mismatches raise CheckpointError naming the keys."""
    load_state_dict_into(model, state_dict, source, allow_unexpected=IGNORED_KEYS)
