"""Command-line + YAML options of the training CLI: defaults < ``--train_config`` YAML < command line.

Every ``TrainOptions`` field is a ``--flag`` with its type and help text; a YAML key that is not an option, or a
value of the wrong type, is an error naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ldm.train.trainer import TrainOptions
from ldm.util import ConfigError

HELP = {
    "data_path": "folder with images + img_txt.csv (dir,text) or metadata.jsonl (file_name,text)",
    "output_path": "where checkpoints, metrics.jsonl, loss.png and validation images go",
    "model_config": "model YAML (configs/v1-inference.yaml, v2-inference.yaml, v2-inference-v.yaml, tiny/...)",
    "pretrained_model_path": "base weights: our/Stability single file or a diffusers folder (empty: random init)",
    "allow_pickle": "read PyTorch pickle checkpoints with the restricted tensor-only unpickler",
    "device_target": "CPU, GPU or Ascend",
    "mode": "0 = GRAPH_MODE (compiled, default), 1 = PYNATIVE_MODE",
    "jit_level": "O0/O1/O2 (default O2 on Ascend, O0 elsewhere)",
    "use_parallel": "data parallel under msrun (gradients averaged over ranks, only rank 0 writes files)",
    "seed": "seed of data order, augmentation, timesteps and noise",
    "image_size": "training resolution (shorter side resized, then cropped square)",
    "random_crop": "random instead of center crop",
    "random_flip": "random horizontal flip",
    "caption_dropout": "probability of replacing a caption by '' (trains the unconditional branch for CFG)",
    "num_workers": "data loader workers",
    "train_batch_size": "images per step per rank",
    "epochs": "passes over the data (ignored when max_train_steps > 0)",
    "max_train_steps": "optimizer updates to run (0: use epochs)",
    "gradient_accumulation_steps": "micro-batches per optimizer update",
    "start_learning_rate": "peak learning rate",
    "end_learning_rate": "final learning rate of linear/cosine decay",
    "scheduler": "constant | linear | cosine (all with linear warmup)",
    "warmup_steps": "warmup updates from 0 to start_learning_rate",
    "betas": "AdamW betas",
    "weight_decay": "AdamW decoupled weight decay",
    "adam_epsilon": "AdamW epsilon",
    "clip_grad": "clip gradients to max_grad_norm (global norm)",
    "max_grad_norm": "global-norm clipping threshold",
    "loss_scaler_type": "none | static | dynamic (dynamic skips overflowing updates and lowers the scale)",
    "init_loss_scale": "initial loss scale",
    "loss_scale_factor": "dynamic scale change factor",
    "scale_window": "finite updates before the dynamic scale grows",
    "use_ema": "keep an EMA of the trainable weights and save it",
    "ema_decay": "EMA decay",
    "ema_warmup_steps": "EMA warmup: decay * (1 - exp(-updates / warmup))",
    "use_lora": "train LoRA adapters (False: fine-tune the whole UNet)",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / rank; default alpha = rank)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_fp16": "compute the LoRA branch in float16 (params stay float32)",
    "lora_targets": "attention (to_q/k/v/out.0) | extended (+ proj_in/out and feed-forward)",
    "lora_ft_text_encoder": "also train LoRA on the text encoder attention",
    "use_recompute": "recompute each UNet block's activations in the backward pass (less memory, ~1 more forward)",
    "attention_slice_size": "UNet attention over this many batch x head rows at a time (0: all; same result)",
    "noise_offset": "offset noise strength (0 disables)",
    "snr_gamma": "min-SNR-gamma loss weighting (e.g. 5.0; empty disables)",
    "ckpt_save_interval": "save weights + resume state every N micro-steps (0: only at the end)",
    "resume": "'True' (resume from <output_path>/ckpt/train_state.safetensors) or a train-state path",
    "validation_prompts": "prompts rendered as a grid every validation_steps",
    "validation_steps": "micro-steps between validation grids (0 disables)",
    "log_interval": "unused by the bar (it updates every step); kept for mindone configs",
}


def _str2bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def _optional_float(value: str):
    return None if value in ("", "None", "none", None) else float(value)


def _field_type(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return {"type": _str2bool}
    if isinstance(default, list):
        return {"nargs": "*", "type": float if f.name == "betas" else str}
    if f.name in ("lora_alpha", "snr_gamma"):
        return {"type": _optional_float}
    if f.name == "jit_level":
        return {"type": str, "choices": ["O0", "O1", "O2"]}
    return {"type": type(default)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune Stable Diffusion (LoRA or full UNet) on image-caption data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--train_config", default="", help="YAML with any of the options below (CLI wins)")
    for f in dataclasses.fields(TrainOptions):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", default=default, help=HELP[f.name], **_field_type(f))
    return parser


def _check_yaml(cfg: dict, path: str) -> dict:
    valid = {f.name: f for f in dataclasses.fields(TrainOptions)}
    out = {}
    for key, value in cfg.items():
        if key not in valid:
            raise ConfigError(f"{path}: unknown option {key!r} (valid: {', '.join(sorted(valid))})")
        kind = _field_type(valid[key])
        try:
            if "nargs" in kind:
                if not isinstance(value, list):
                    raise TypeError("expected a list")
                value = [kind["type"](v) for v in value]
            elif kind["type"] is _str2bool:
                if not isinstance(value, bool):
                    raise TypeError("expected true/false")
            elif value is not None:
                if kind["type"] is int and isinstance(value, float) and value != int(value):
                    raise TypeError("expected an integer")
                value = kind["type"](value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{path}: option {key!r} has a wrong value {cfg[key]!r}: {exc}") from None
        out[key] = value
    return out


def parse_options(argv=None) -> TrainOptions:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.train_config:
        from omegaconf import OmegaConf

        from ldm.util import load_config

        cfg = OmegaConf.to_container(load_config(args.train_config), resolve=True)
        parser.set_defaults(**_check_yaml(cfg, args.train_config))
    args = parser.parse_args(argv)
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "train_config"}
    return TrainOptions(**values)


def resolve_model_config(opts: TrainOptions):
    from ldm.util import load_config

    path = Path(opts.model_config)
    return load_config(path)
