"""Diffusers pipeline folders <-> our model config and state dict.

A diffusers Stable Diffusion folder holds ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/`` and
``tokenizer/``, each with a ``config.json``. We translate those configs into our YAML model config (so a folder
converts without a hand-written config) and back (so an exported folder loads in diffusers), and route each
component's weights through its key map in ``ldm/io/*_keys.py``. Settings our networks do not implement (other
block types, attention in the VAE encoder, class embeddings...) are refused by name instead of silently ignored.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ldm.atomic import atomic_folder, write_json
from ldm.io import text_encoder_keys, unet_keys, vae_keys
from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.names import TEXT_ENCODER_CLASSES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, family_of_config, model_node

WEIGHT_FILES = {
    "unet": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "vae": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
SD2_EXCLAMATION_NOTE = (
    "SD2 prompts containing '!' tokenise differently here and in diffusers: the SD2 tokenizer folder names '!' "
    "(id 0) as its pad token, so transformers cuts every '!' out as id 0 ('wow!!' -> 'wow', '!', '!'), while this "
    "project follows open_clip, the tokenizer SD2 was trained with ('wow', '!!'). Weights are unaffected; images "
    "from such prompts differ between the two"
)


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "unet" / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a diffusers folder needs unet/, vae/ and text_encoder/)") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# Allow-lists of the config.json keys each converter understands. A key maps to the values our network implements
# (a tuple), or to READ when the converter turns it into our config; IGNORED keys do not change the network's output
# (bookkeeping, initialisation, precision hints). Keys starting with "_" are metadata. Any other
# key, or another value, is refused by name: converting it would silently give a different network.
READ, IGNORED = "read", "ignored"

UNET_KEYS = {
    **dict.fromkeys(
        (
            "sample_size in_channels out_channels down_block_types up_block_types block_out_channels "
            "layers_per_block attention_head_dim num_attention_heads cross_attention_dim use_linear_projection "
            "transformer_layers_per_block"
        ).split(),
        READ,
    ),
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0.0,),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "addition_embed_type_num_heads": IGNORED,  # only read with an addition_embed_type
    "num_class_embeds": (None,),
    "upcast_attention": IGNORED,  # our attention scores are float32 whenever the model runs in float32
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
VAE_KEYS = {
    **dict.fromkeys(
        (
            "in_channels out_channels down_block_types up_block_types block_out_channels layers_per_block "
            "latent_channels sample_size scaling_factor"
        ).split(),
        READ,
    ),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
    "force_upcast": IGNORED,  # a float16 inference hint
}
TEXT_KEYS = {
    **dict.fromkeys(
        (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads max_position_embeddings"
        ).split(),
        READ,
    ),
    "hidden_act": ("quick_gelu", "gelu"),
    "layer_norm_eps": (1e-5,),
    "model_type": ("clip_text_model",),
    "architectures": (None, ["CLIPTextModel"]),
    "attention_dropout": (0.0,),
    "dropout": (0.0,),
    "pruned_heads": ({},),
    "chunk_size_feed_forward": (0,),
    # bookkeeping, initialisation, token ids of the pooled output (Stable Diffusion uses the hidden states), the
    # unused projection head and the text-generation defaults older transformers wrote into every config
    **dict.fromkeys(
        (
            "transformers_version torch_dtype dtype initializer_range initializer_factor bos_token_id "
            "eos_token_id pad_token_id sep_token_id decoder_start_token_id projection_dim output_hidden_states "
            "output_attentions return_dict torchscript use_bfloat16 tf_legacy_loss is_encoder_decoder is_decoder "
            "add_cross_attention cross_attention_hidden_size tie_encoder_decoder tie_word_embeddings id2label "
            "label2id problem_type finetuning_task tokenizer_class prefix task_specific_params max_length "
            "min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k "
            "top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size "
            "bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id "
            "forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens "
            "begin_suppress_tokens"
        ).split(),
        IGNORED,
    ),
}
# Only the keys that define the training noise schedule; sampling settings (timestep spacing, clipping, solver
# order...) are chosen at generation time, so any scheduler class's are accepted.
SCHEDULER_KEYS = {
    "beta_schedule": ("scaled_linear", "linear"),
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
}


def _uniform(value: Any) -> Any:
    """A per-block list whose entries are all equal (``[False, False]``) stands for that one value."""
    if isinstance(value, list) and value and all(v == value[0] for v in value) and not isinstance(value[0], list):
        return value[0]
    return value


def _check_keys(cfg: dict, allowed: dict, source: Path, strict: bool = True) -> None:
    """Refuse, by name, any key of ``cfg`` outside ``allowed`` (when ``strict``) or with a value not implemented."""
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        rule = allowed.get(key)
        if rule is None:
            if strict:
                raise CheckpointError(
                    f"{source}: setting {key!r} is not understood by the converter, so converting could change "
                    "the network; remove it if it is known to be harmless"
                )
            continue
        if rule in (READ, IGNORED):
            continue
        if value not in rule and _uniform(value) not in rule:
            supported = " or ".join(repr(v) for v in rule)
            raise CheckpointError(
                f"{source}: {key}={value!r} is not implemented by this model (supported: {supported})"
            )


# ----------------------------------------------------------------------------------------------- configs
def _unet_params(cfg: dict, source: Path) -> dict:
    _check_keys(cfg, UNET_KEYS, source)
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(f"{source}: block_out_channels {channels} are not multiples of {channels[0]}")
    down = list(cfg["down_block_types"])
    attention_resolutions = []
    for level, kind in enumerate(down):
        if kind == "CrossAttnDownBlock2D":
            attention_resolutions.append(2**level)
        elif kind != "DownBlock2D":
            raise CheckpointError(f"{source}: unsupported down block type {kind!r}")
    mirrored = ["CrossAttnUpBlock2D" if kind == "CrossAttnDownBlock2D" else "UpBlock2D" for kind in reversed(down)]
    if list(cfg.get("up_block_types", mirrored)) != mirrored:
        raise CheckpointError(f"{source}: up_block_types {cfg['up_block_types']} must mirror down_block_types {down}")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise CheckpointError(f"{source}: per-level transformer_layers_per_block {depth} is not supported")
        depth = depth[0]
    params = {
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": base,
        "attention_resolutions": sorted(attention_resolutions, reverse=True),
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "channel_mult": [c // base for c in channels],
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "transformer_depth": depth,
        "context_dim": cfg["cross_attention_dim"],
    }
    if cfg.get("upcast_attention"):
        params["upcast_attention"] = True
    if len(set(heads)) == 1:
        params["num_heads"] = heads[0]
    else:
        head_channels = {c // h for c, h in zip(channels, heads)}
        if len(head_channels) != 1:
            raise CheckpointError(f"{source}: attention heads {heads} give unequal head sizes for {channels}")
        params["num_head_channels"] = head_channels.pop()
    return params


def _vae_params(cfg: dict, source: Path) -> tuple[dict, float]:
    _check_keys(cfg, VAE_KEYS, source)
    channels = list(cfg["block_out_channels"])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(block != kind for block in cfg.get(key, [])):
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not implemented by this model (only {kind!r})")
    z = cfg.get("latent_channels", 4)
    ddconfig = {
        "double_z": True,
        "z_channels": z,
        "resolution": cfg.get("sample_size", 256),
        "in_channels": cfg.get("in_channels", 3),
        "out_ch": cfg.get("out_channels", 3),
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return {"embed_dim": z, "ddconfig": ddconfig}, float(cfg.get("scaling_factor", 0.18215))


def text_family(cfg: dict) -> str:
    """SD1 text encoders are OpenAI CLIP (quick_gelu); SD2's OpenCLIP ViT-H uses exact gelu."""
    return "sd1" if cfg.get("hidden_act", "quick_gelu") == "quick_gelu" else "sd2"


def _text_params(cfg: dict, source: Path) -> tuple[str, dict]:
    _check_keys(cfg, TEXT_KEYS, source)
    family = text_family(cfg)
    width = cfg["hidden_size"]
    if cfg.get("intermediate_size", 4 * width) != 4 * width:
        raise CheckpointError(f"{source}: intermediate_size {cfg['intermediate_size']} != 4 * hidden_size")
    params = {
        "vocab_size": cfg.get("vocab_size", 49408),
        "width": width,
        "layers": cfg["num_hidden_layers"],
        "heads": cfg["num_attention_heads"],
        "max_length": cfg.get("max_position_embeddings", 77),
    }
    return family, params


def config_from_diffusers(folder: str | Path) -> dict:
    """Our model config (``{"model": {"target": ..., "params": ...}}``) for a diffusers SD folder."""
    folder = Path(folder)
    unet_cfg = _read_json(folder / "unet" / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    text_cfg = _read_json(folder / "text_encoder" / "config.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}
    _check_keys(sched, SCHEDULER_KEYS, sched_path, strict=False)
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{sched_path}: unsupported prediction_type {prediction!r}")
    vae_params, scale_factor = _vae_params(vae_cfg, folder / "vae" / "config.json")
    family, text_params = _text_params(text_cfg, folder / "text_encoder" / "config.json")
    unet_params = _unet_params(unet_cfg, folder / "unet" / "config.json")
    return {
        "model": {
            "target": "ldm.models.diffusion.LatentDiffusion",
            "params": {
                "parameterization": PREDICTION_TYPES[prediction],
                "beta_schedule": sched.get("beta_schedule", "scaled_linear"),
                "linear_start": sched.get("beta_start", 0.00085),
                "linear_end": sched.get("beta_end", 0.012),
                "timesteps": sched.get("num_train_timesteps", 1000),
                "scale_factor": scale_factor,
                "image_size": unet_cfg.get("sample_size", 64),
                "channels": unet_params["in_channels"],
                "unet_config": {"target": "ldm.models.unet.UNetModel", "params": unet_params},
                "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae_params},
                "cond_stage_config": {"target": TEXT_ENCODER_CLASSES[family], "params": text_params},
            },
        }
    }


def _unet_layout(unet_params: dict) -> dict:
    return {
        "num_res_blocks": unet_params["num_res_blocks"],
        "channel_mult": list(unet_params.get("channel_mult", (1, 2, 4, 8))),
        "attention_resolutions": list(unet_params["attention_resolutions"]),
    }


def _vae_layout(vae_params: dict) -> dict:
    dd = vae_params["ddconfig"]
    return {"num_levels": len(dd["ch_mult"]), "num_res_blocks": dd["num_res_blocks"]}


def diffusers_configs(config: Any) -> dict[str, dict]:
    """diffusers ``config.json`` contents for each component of our model config (inverse of
    :func:`config_from_diffusers` for the settings both sides have)."""
    p = model_node(config)["params"]
    unet = p["unet_config"]["params"]
    vae = p["first_stage_config"]["params"]
    text = p["cond_stage_config"]["params"]
    family = family_of_config(config)
    mult = list(unet.get("channel_mult", (1, 2, 4, 8)))
    channels = [unet["model_channels"] * m for m in mult]
    attn = set(unet["attention_resolutions"])
    has_attn = [2**i in attn for i in range(len(mult))]
    if unet.get("num_head_channels", -1) not in (-1, None):
        heads = [c // unet["num_head_channels"] for c in channels]
    else:
        heads = [unet["num_heads"]] * len(channels)
    dd = vae["ddconfig"]
    width = text.get("width", 768 if family == "sd1" else 1024)
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}[
        {"velocity": "v"}.get(p.get("parameterization", "eps"), p.get("parameterization", "eps"))
    ]
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": p.get("image_size", 64),
            "in_channels": unet["in_channels"],
            "out_channels": unet["out_channels"],
            "block_out_channels": channels,
            "layers_per_block": unet["num_res_blocks"],
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "attention_head_dim": heads,
            "cross_attention_dim": unet["context_dim"],
            "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
            "upcast_attention": bool(unet.get("upcast_attention", False)),
            "transformer_layers_per_block": unet.get("transformer_depth", 1),
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "in_channels": dd["in_channels"],
            "out_channels": dd["out_ch"],
            "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
            "down_block_types": ["DownEncoderBlock2D"] * len(dd["ch_mult"]),
            "up_block_types": ["UpDecoderBlock2D"] * len(dd["ch_mult"]),
            "layers_per_block": dd["num_res_blocks"],
            "latent_channels": dd["z_channels"],
            "norm_num_groups": 32,
            "act_fn": "silu",
            "sample_size": dd.get("resolution", 256),
            "scaling_factor": p.get("scale_factor", 0.18215),
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": text.get("vocab_size", 49408),
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": text.get("layers", 12 if family == "sd1" else 23),
            "num_attention_heads": text.get("heads", 12 if family == "sd1" else 16),
            "max_position_embeddings": text.get("max_length", 77),
            "hidden_act": "quick_gelu" if family == "sd1" else "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": width,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "torch_dtype": "float32",
        },
        "scheduler": {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": p.get("timesteps", 1000),
            "beta_start": p.get("linear_start", 0.00085),
            "beta_end": p.get("linear_end", 0.012),
            "beta_schedule": p.get("beta_schedule", "scaled_linear"),
            "prediction_type": prediction,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
    }


# ----------------------------------------------------------------------------------------------- weights
def _component_file(folder: Path, component: str) -> Path:
    for name in WEIGHT_FILES[component]:
        path = folder / component / name
        if path.is_file():
            return path
    raise CheckpointError(f"{folder / component}: no weights file (looked for {', '.join(WEIGHT_FILES[component])})")


def read_diffusers_folder(folder: str | Path, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict in our full names, our model config) of a diffusers SD folder."""
    folder = Path(folder)
    config = config_from_diffusers(folder)
    p = config["model"]["params"]
    family = family_of_config(config)
    out: dict[str, np.ndarray] = {}
    parts = (
        ("unet", UNET_PREFIX, lambda sd: unet_keys.diffusers_to_ldm(sd, **_unet_layout(p["unet_config"]["params"]))),
        ("vae", VAE_PREFIX, lambda sd: vae_keys.diffusers_to_ldm(sd, **_vae_layout(p["first_stage_config"]["params"]))),
        ("text_encoder", TEXT_PREFIX, lambda sd: text_encoder_keys.diffusers_to_ldm(sd, family=family)),
    )
    if family == "sd2":
        warnings.warn(f"{folder}: {SD2_EXCLAMATION_NOTE}", stacklevel=2)
    for component, prefix, convert in parts:
        path = _component_file(folder, component)
        try:
            converted = convert(read_state_dict(path, allow_pickle=allow_pickle))
        except KeyError as exc:
            raise CheckpointError(f"{path}: {exc.args[0]}") from None
        out.update({prefix + k: v for k, v in converted.items()})
    return out, config


def _split_prefixes(state_dict: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    parts: dict[str, dict[str, np.ndarray]] = {UNET_PREFIX: {}, VAE_PREFIX: {}, TEXT_PREFIX: {}}
    for key, value in state_dict.items():
        for prefix, part in parts.items():
            if key.startswith(prefix):
                part[key[len(prefix) :]] = value
                break
        else:
            raise CheckpointError(f"unexpected key {key!r}: not under {', '.join(parts)}")
    return parts


def write_diffusers_folder(
    state_dict: dict[str, np.ndarray],
    config: Any,
    folder: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers SD folder (weights, component configs, model_index.json, tokenizer files).

    The folder is assembled beside the target and renamed into place by ``ldm.atomic.atomic_folder``, so an
    interrupted export leaves no partial folder and an overwritten one is renamed aside, not deleted, until the new
    one is in place; an existing target is only replaced with ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder}: already exists (pass overwrite to replace it)")
    node = model_node(config)
    p = node["params"]
    family = family_of_config(config)
    parts = _split_prefixes(state_dict)
    weights = {
        "unet": unet_keys.ldm_to_diffusers(parts[UNET_PREFIX], **_unet_layout(p["unet_config"]["params"])),
        "vae": vae_keys.ldm_to_diffusers(parts[VAE_PREFIX], **_vae_layout(p["first_stage_config"]["params"])),
        "text_encoder": text_encoder_keys.ldm_to_diffusers(parts[TEXT_PREFIX], family=family),
    }
    configs = diffusers_configs(config)
    if family == "sd2":
        warnings.warn(f"{folder}: {SD2_EXCLAMATION_NOTE}", stacklevel=2)
    with atomic_folder(folder, overwrite=True) as staging:
        for component, sd in weights.items():
            (staging / component).mkdir()
            write_state_dict(staging / component / WEIGHT_FILES[component][0], sd, metadata={"format": "pt"})
            write_json(staging / component / "config.json", configs[component])
        (staging / "scheduler").mkdir()
        write_json(staging / "scheduler" / "scheduler_config.json", configs["scheduler"])
        _write_tokenizer(staging / "tokenizer", family, p["cond_stage_config"]["params"].get("max_length", 77))
        write_json(staging / "model_index.json", _model_index())
    return folder


def _write_tokenizer(directory: Path, family: str, max_length: int) -> None:
    from ldm.tokenizer import CLIPTokenizer

    directory.mkdir()
    tokenizer = CLIPTokenizer.for_family(family, context_length=max_length)
    tokenizer.save_hf_vocab(str(directory))
    pad = "<|endoftext|>" if family == "sd1" else "!"
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    write_json(directory / "special_tokens_map.json", special)
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True}
    write_json(directory / "tokenizer_config.json", {**tokenizer_config, **special})


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
