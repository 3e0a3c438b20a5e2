"""Options of a training run: the schema (``TrainOptions``, with help and choices in each field's metadata), the
parser (defaults < ``--train_config`` YAML < command line, through :mod:`ldm.options`) and the checks that need no
MindSpore.

Every field is a ``--flag`` (kebab spelling accepted) and a YAML key, checked as :mod:`ldm.options` describes.
``model_config`` given in a YAML is found relative to that YAML, then in the working directory, then among the
bundled configs (``ldm/configs/``); on the command line, relative to the working directory first.
:func:`resolve_train_config` picks the model config: ``--model_config`` on the command line, else the one
``pretrained_model_path`` carries (diffusers folder or embedded config), else the YAML's or the default.
This module imports neither MindSpore nor the trainer, so ``-h`` and bad options answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm.cli import Parser, str2bool
from ldm.data.buckets import BucketSpec
from ldm.data.captions import CaptionRules
from ldm.data.kohya import FolderOptions, read_dataset_config, read_records
from ldm.io.model_config import ResolvedConfig, find_config_file, resolve_model_config
from ldm.lora.targets import LORA_TYPES, UNET_TARGET_PRESETS
from ldm.options import (
    RunOptions,
    add_options,
    check_run_options,
    option,
    optional_float,
    optional_int,
    parse_over_file,
    read_options_file,
)
from ldm.precision import PRECISIONS, PrecisionPolicy, default_loss_scaler, resolve_policy
from ldm.train.kinds import JIT_LEVELS, LOSS_SCALERS
from ldm.train.lr_schedules import SCHEDULES
from ldm.util import ConfigError

LOGGER = logging.getLogger("ldm.train")
DEFAULT_MODEL_CONFIG = "ldm/configs/v2-inference.yaml"


@dataclass
class TrainOptions(RunOptions):
    """Every option of a run; the CLI fills it from defaults < YAML < command line."""

    data_path: str = option(
        "",
        "folder with images + img_txt.csv (dir,text) or metadata.jsonl (file_name,text), or kohya's layout: images "
        "with caption sidecars, in N_name subfolders repeated N times per epoch",
    )
    dataset_config: str = option(
        "",
        "kohya dataset config (.toml, or .yaml): [[datasets.subsets]] with image_dir, num_repeats and caption "
        "options each; replaces data_path, and its dataset-level keys (resolution, bucket options) win; "
        "is_reg = true subsets are DreamBooth class images (with with_prior_preservation)",
    )
    caption_extension: str = option(".txt", "caption sidecar extension in kohya folders (kohya's default: .caption)")
    strict_captions: bool = option(
        False, "an image without a caption sidecar is an error (default: a warning; it trains on its class tokens)"
    )
    output_path: str = option("output", "where checkpoints, metrics.jsonl, loss.png and validation images go")
    model_config: str = option(
        "",
        "model YAML (ldm/configs/v1-inference.yaml, v2-inference.yaml, v2-inference-v.yaml, tiny/...); empty: the "
        f"config pretrained_model_path carries, else {DEFAULT_MODEL_CONFIG}",
    )
    pretrained_model_path: str = option(
        "", "base weights: our/Stability single file or a diffusers folder (empty: random init)"
    )
    allow_pickle: bool = option(False, "read PyTorch pickle checkpoints with the restricted tensor-only unpickler")
    jit_level: str | None = option(None, "O0/O1/O2 (default O2 on Ascend, O0 elsewhere)", choices=JIT_LEVELS)
    use_parallel: bool = option(
        False, "data parallel under msrun (gradients averaged over ranks, only rank 0 writes files)"
    )
    seed: int = option(3407, "seed of data order, augmentation, timesteps and noise")
    image_size: int = option(512, "training resolution (shorter side resized, then cropped square)")
    random_crop: bool = option(False, "random instead of center crop")
    random_flip: bool = option(False, "random horizontal flip")
    caption_dropout: float = option(
        0.0, "probability of replacing a caption by '' (trains the unconditional branch; kohya's caption_dropout_rate)"
    )
    shuffle_caption: bool = option(False, "shuffle the comma-separated tags of each caption at every visit")
    keep_tokens: int = option(0, "with shuffle_caption/caption_tag_dropout_rate: the first N tags stay in place")
    caption_tag_dropout_rate: float = option(0.0, "probability of dropping each (non-kept) tag at every visit")
    caption_prefix: str = option("", "text put before every caption (joined with a space)")
    caption_suffix: str = option("", "text put after every caption (joined with a space)")
    enable_bucket: bool = option(
        False,
        "aspect-ratio buckets (kohya): each image trains at the bucket of nearest aspect ratio, resized to cover it "
        "and cropped, instead of a square of image_size; every batch holds one bucket",
    )
    resolution: str = option(
        "", "bucket area as 'W,H' or 'S' (S x S), kohya's resolution; empty: image_size x image_size"
    )
    min_bucket_reso: int = option(256, "smallest bucket side")
    max_bucket_reso: int = option(1024, "largest bucket side")
    bucket_reso_steps: int = option(
        64, "bucket sides are multiples of this; must be a multiple of the model's 8 x 2^(UNet levels - 1) pixels"
    )
    bucket_no_upscale: bool = option(
        False, "never enlarge: each image's bucket is its own size (shrunk to the area), sides cut to the steps"
    )
    num_workers: int = option(1, "data loader workers")
    cache_latents: bool = option(
        False,
        "encode each image once with the frozen VAE (both flips with random_flip) and train on the cached posteriors; "
        "the VAE encoder is then released (same results as uncached; random_crop turns it off, with a warning)",
    )
    cache_text_embeddings: bool = option(
        False,
        "encode each caption (and '' for caption_dropout, and the validation prompts) once with the frozen text "
        "encoder, then release it (kohya's cache_text_encoder_outputs; lora_ft_text_encoder turns it off, with a "
        "warning)",
    )
    train_batch_size: int = option(1, "images per step per rank")
    epochs: int = option(10, "passes over the data (ignored when max_train_steps > 0)")
    max_train_steps: int = option(0, "optimizer updates to run (0: use epochs)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer update")
    start_learning_rate: float = option(1e-4, "peak learning rate")
    text_encoder_lr: float | None = option(
        None,
        "peak learning rate of the text-encoder LoRA (lora_ft_text_encoder; kohya's text_encoder_lr): its schedule is "
        "the UNet's times text_encoder_lr / start_learning_rate (not set: start_learning_rate)",
        parse=optional_float,
    )
    end_learning_rate: float = option(0.0, "final learning rate of linear/cosine decay")
    scheduler: str = option("constant", "learning-rate schedule (all with linear warmup)", choices=SCHEDULES)
    warmup_steps: int = option(0, "warmup updates from 0 to start_learning_rate")
    betas: list = option([0.9, 0.999], "AdamW betas", items=float)
    weight_decay: float = option(1e-2, "AdamW decoupled weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    clip_grad: bool = option(True, "clip gradients to max_grad_norm (global norm)")
    max_grad_norm: float = option(1.0, "global-norm clipping threshold")
    loss_scaler_type: str | None = option(
        None,
        "dynamic skips overflowing updates and lowers the scale (not set: dynamic for fp16, none otherwise)",
        choices=LOSS_SCALERS,
    )
    init_loss_scale: float = option(65536.0, "initial loss scale")
    loss_scale_factor: int = option(2, "dynamic scale change factor")
    scale_window: int = option(1000, "finite updates before the dynamic scale grows")
    use_ema: bool = option(False, "keep an EMA of the trainable weights and save it")
    ema_decay: float = option(0.9999, "EMA decay")
    ema_warmup_steps: int = option(2000, "EMA warmup: decay * (1 - exp(-updates / warmup))")
    use_lora: bool = option(True, "train LoRA adapters (False: fine-tune the whole UNet)")
    lora_rank: int = option(4, "LoRA rank")
    lora_alpha: float | None = option(
        None, "LoRA alpha (scale = alpha / rank; default alpha = rank)", parse=optional_float
    )
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_fp16: bool = option(False, "compute the LoRA branch in float16 (params stay float32)")
    lora_type: str = option(
        "lora",
        "adapter kind: lora (LoRA; LoCon with conv_rank) | dora (weight-decomposed LoRA: magnitude x direction, "
        "peft's use_dora formula)",
        choices=LORA_TYPES,
    )
    use_dora: bool = option(False, "peft's/diffusers' spelling: True means lora_type dora")
    conv_rank: int = option(
        0,
        "LoCon (kohya's conv_dim): LoRA rank of the UNet's 3x3 ResBlock/Downsample/Upsample convs; also adapts SD1's "
        "1x1 proj_in/proj_out and the ResBlocks' time-embedding Linear and 1x1 shortcut at lora_rank. 0: off",
    )
    conv_alpha: float | None = option(
        None,
        "LoCon alpha of the 3x3 convs (kohya's conv_alpha; scale = conv_alpha / conv_rank; default conv_alpha = "
        "conv_rank, like lora_alpha, where kohya defaults to 1)",
        parse=optional_float,
    )
    precision: str | None = option(
        None,
        "compute dtype of the UNet (and by default the text encoder): Dense/Conv in it, frozen weights stored in it, "
        "trainable weights kept as fp32 masters, norms and softmax in fp32 (not set: fp32, or fp16 with use_fp16)",
        choices=PRECISIONS,
    )
    lora_targets: str = option(
        "attention",
        "attention (to_q/k/v/out.0) | extended (+ proj_in/out and feed-forward)",
        choices=tuple(UNET_TARGET_PRESETS),
    )
    lora_ft_text_encoder: bool = option(False, "also train LoRA on the text encoder attention")
    fuse_lora_projections: bool = option(
        False,
        "compute each UNet attention's LoRA q/k/v (and cross-attention's k/v) as one projection: fewer MatMuls, same "
        "results and checkpoints; not faster on the CPU (benchmarks/README.md), for devices where launches dominate",
    )
    use_recompute: bool | None = option(
        None,
        "recompute each UNet block's activations in the backward pass (less memory, ~1 more forward; not set: the "
        "memory plan chooses)",
        parse=str2bool,
    )
    attention_slice_size: int | None = option(
        None,
        "UNet attention over this many batch x head rows at a time (0: all; same result; not set: the memory plan "
        "chooses)",
        parse=optional_int,
    )
    memory_efficient_attention: bool | None = option(
        None,
        "UNet attention in slices with a backward that recomputes the scores instead of storing them (less memory; "
        "same forward, gradients equal to float rounding; not set: the memory plan chooses)",
        parse=str2bool,
    )
    noise_offset: float = option(0.0, "offset noise strength (0 disables)")
    snr_gamma: float | None = option(
        None, "min-SNR-gamma loss weighting (e.g. 5.0; empty disables)", parse=optional_float
    )
    ckpt_save_interval: int = option(0, "save weights + resume state every N micro-steps (0: only at the end)")
    checkpoints_total_limit: int = option(
        0,
        "keep only the newest N weight files in <output_path>/ckpt (0: all); the one the train state points to is "
        "never deleted (diffusers' checkpoints_total_limit)",
    )
    init_lora_weights: str = option(
        "",
        "start the LoRA from this adapter: ours, diffusers/PEFT or kohya .safetensors, or a PEFT folder (what python "
        "-m ldm.lora import reads; kohya's network_weights). Not a resume: optimizer and step start afresh; its "
        "modules and rank must match lora_targets, lora_ft_text_encoder and lora_rank",
    )
    resume: str = option("", "'True' (resume from <output_path>/ckpt/train_state.safetensors) or a train-state path")
    instance_data_dir: str = option(
        "", "DreamBooth: folder of the subject's images (all image files in it; replaces data_path)"
    )
    instance_prompt: str = option("", "DreamBooth: the caption of every instance image, with the subject's token")
    class_data_dir: str = option(
        "", "DreamBooth: folder of class images; missing ones are generated there by the base model"
    )
    class_prompt: str = option("", "DreamBooth: the prompt of the class images (the subject's class, no token)")
    with_prior_preservation: bool = option(
        False,
        "DreamBooth: add the class images' loss (prior preservation) to the instance loss; class images from "
        "class_data_dir, or a dataset_config's is_reg subsets (pairs share a bucket with enable_bucket)",
    )
    prior_loss_weight: float = option(1.0, "DreamBooth: loss = instance loss + prior_loss_weight * prior loss")
    num_class_images: int = option(
        100, "DreamBooth: class images to train with; fewer in class_data_dir are topped up by generation"
    )
    sample_batch_size: int = option(4, "DreamBooth: images per call when generating class images")
    validation_prompts: list = option([], "prompts rendered as a grid every validation_steps", items=str)
    validation_steps: int = option(0, "micro-steps between validation grids (0 disables)")
    validation_data_path: str = option(
        "", "folder of held-out images (same layouts as data_path) for the validation loss (kohya's validation set)"
    )
    validation_split: float = option(
        0.0, "fraction of data_path held out for the validation loss, never trained on (kohya's validation_split)"
    )
    validation_loss_steps: int = option(
        0,
        "micro-steps between validation-loss evaluations (0: only before the first step and after the last); needs "
        "validation_data_path or validation_split",
    )
    validation_loss_timesteps: list = option(
        [],
        "timesteps the validation loss is measured at, each with fixed noise (empty: 5 spread over the schedule, "
        "100 300 500 700 900 for 1000 steps)",
        items=int,
    )
    log_interval: int = option(10, "unused by the bar (it updates every step); kept for mindone configs")
    model_config_on_command_line: bool = option(
        False, "model_config was given on the command line (it then wins over the weights' own config)", cli=False
    )


def build_parser() -> Parser:
    parser = Parser(
        description="Fine-tune Stable Diffusion (LoRA or full UNet) on image-caption data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--train_config", default="", help="YAML with any of the options below (CLI wins)")
    add_options(parser, TrainOptions)
    return parser


def resolve_cache_options(opts: TrainOptions, source: str = "TrainOptions") -> TrainOptions:
    """``opts`` with each cache turned off whose inputs change between visits, with a warning naming both options:
    ``random_crop`` crops anew at every visit (one cached latent per image cannot reproduce that), and
    ``lora_ft_text_encoder`` trains the encoder whose outputs ``cache_text_embeddings`` would keep."""
    if opts.cache_latents and opts.random_crop:
        LOGGER.warning(
            "%s: 'random_crop' is on, so 'cache_latents' is turned off: each visit crops anew, which one cached latent "
            "per image cannot reproduce; the VAE encodes every batch",
            source,
        )
        opts = dataclasses.replace(opts, cache_latents=False)
    if opts.cache_text_embeddings and captions_vary(opts):
        LOGGER.warning(
            "%s: 'shuffle_caption' or 'caption_tag_dropout_rate' changes captions at every visit, so "
            "'cache_text_embeddings' is turned off; the text encoder encodes every batch",
            source,
        )
        opts = dataclasses.replace(opts, cache_text_embeddings=False)
    if opts.cache_text_embeddings and opts.lora_ft_text_encoder:
        LOGGER.warning(
            "%s: 'lora_ft_text_encoder' trains the text encoder, so 'cache_text_embeddings' is turned off; the text "
            "encoder encodes every batch",
            source,
        )
        opts = dataclasses.replace(opts, cache_text_embeddings=False)
    return opts


def caption_rules(opts: TrainOptions) -> CaptionRules:
    """The caption options as rules (a dataset config's subsets start from them)."""
    try:
        return CaptionRules(
            opts.shuffle_caption,
            opts.keep_tokens,
            opts.caption_tag_dropout_rate,
            opts.caption_dropout,
            opts.caption_prefix,
            opts.caption_suffix,
        )
    except ValueError as err:
        raise ConfigError(f"caption options: {err}") from None


def folder_options(opts: TrainOptions) -> FolderOptions:
    return FolderOptions(opts.dataset_config, opts.caption_extension, opts.strict_captions)


def validation_folder_options(opts: TrainOptions) -> FolderOptions:
    """How ``validation_data_path`` is read: a folder in any layout ``data_path`` takes (no dataset config)."""
    return FolderOptions("", opts.caption_extension, opts.strict_captions)


def captions_vary(opts: TrainOptions) -> bool:
    """Whether some caption changes between visits beyond dropout (tag shuffle or tag dropout, here or in a
    subset of the dataset config)."""
    if opts.dataset_config:
        config = read_dataset_config(opts.dataset_config, opts.caption_extension, caption_rules(opts))
        return any(subset.rules.varies for subset in config.subsets)
    return caption_rules(opts).varies


def apply_dataset_config(opts: TrainOptions, source: str = "TrainOptions") -> TrainOptions:
    """``opts`` with the dataset-level keys of its ``dataset_config`` (resolution, bucket options) replacing the
    options of the same name, as kohya does; each one that changes a value is logged."""
    if not opts.dataset_config:
        return opts
    config = read_dataset_config(opts.dataset_config, opts.caption_extension, caption_rules(opts))
    changed = {k: v for k, v in config.options.items() if getattr(opts, k) != v}
    if changed:
        LOGGER.info("%s: %s sets %s", source, opts.dataset_config, ", ".join(f"{k}={v}" for k, v in changed.items()))
    return dataclasses.replace(opts, **changed)


def bucket_spec(opts: TrainOptions) -> BucketSpec | None:
    """The bucket options as a :class:`BucketSpec` (``None`` without ``enable_bucket``); bad values name them."""
    if not opts.enable_bucket:
        return None
    text = opts.resolution.strip() or str(opts.image_size)
    try:
        sides = [int(v) for v in text.split(",")]
        if len(sides) not in (1, 2):
            raise ValueError("expected 'W,H' or 'S'")
        width, height = sides if len(sides) == 2 else sides * 2
        return BucketSpec(
            (width, height), opts.min_bucket_reso, opts.max_bucket_reso, opts.bucket_reso_steps, opts.bucket_no_upscale
        )
    except ValueError as err:
        raise ConfigError(f"bucket options (resolution {text!r}): {err}") from None


def check_training_controls(opts: TrainOptions, source: str = "TrainOptions") -> None:
    """``init_lora_weights``, ``text_encoder_lr`` and ``checkpoints_total_limit`` fit the rest of the run."""
    if opts.init_lora_weights and not opts.use_lora:
        raise ConfigError(f"{source}: 'init_lora_weights' needs 'use_lora'")
    if opts.init_lora_weights and opts.resume:
        raise ConfigError(
            f"{source}: 'init_lora_weights' starts a new run from an adapter and 'resume' continues one; give one"
        )
    if opts.text_encoder_lr is not None:
        if not (opts.use_lora and opts.lora_ft_text_encoder):
            raise ConfigError(f"{source}: 'text_encoder_lr' needs 'lora_ft_text_encoder' (a text-encoder LoRA)")
        if opts.start_learning_rate <= 0 or opts.text_encoder_lr < 0:
            raise ConfigError(
                f"{source}: 'text_encoder_lr' scales the schedule by text_encoder_lr / start_learning_rate: need "
                f"start_learning_rate > 0 and text_encoder_lr >= 0, got {opts.start_learning_rate} and "
                f"{opts.text_encoder_lr}"
            )
    if opts.checkpoints_total_limit < 0:
        raise ConfigError(f"{source}: 'checkpoints_total_limit' must be >= 0, got {opts.checkpoints_total_limit}")


def check_validation_options(opts: TrainOptions, source: str = "TrainOptions") -> None:
    """The validation-loss options agree: one validation set at most, a split in [0, 1), and the loss options
    only with a set."""
    if opts.validation_data_path and opts.validation_split:
        raise ConfigError(f"{source}: give 'validation_data_path' or 'validation_split', not both")
    if not 0.0 <= opts.validation_split < 1.0:
        raise ConfigError(f"{source}: 'validation_split' must be in [0, 1), got {opts.validation_split}")
    has_set = bool(opts.validation_data_path or opts.validation_split)
    for name in ("validation_loss_steps", "validation_loss_timesteps"):
        if getattr(opts, name) and not has_set:
            raise ConfigError(f"{source}: '{name}' needs 'validation_data_path' or 'validation_split'")
    if opts.validation_loss_steps < 0:
        raise ConfigError(f"{source}: 'validation_loss_steps' must be >= 0, got {opts.validation_loss_steps}")


def is_dreambooth(opts: TrainOptions) -> bool:
    """Whether the run trains DreamBooth (instance folder, or a dataset config's instance and ``is_reg`` subsets)."""
    return bool(opts.instance_data_dir or opts.with_prior_preservation)


def check_dreambooth(opts: TrainOptions) -> None:
    """The DreamBooth options fit together (diffusers' ``train_dreambooth_lora.py`` rules; with a kohya dataset
    config, its ``is_reg`` subsets are the class images); a ValueError names the option missing or in conflict."""
    if not opts.instance_data_dir and not opts.dataset_config:
        for name in ("instance_prompt", "with_prior_preservation"):
            if getattr(opts, name):
                raise ValueError(f"{name} is a DreamBooth option: it needs instance_data_dir (or dataset_config)")
        return
    if not is_dreambooth(opts):
        return
    if opts.data_path:
        raise ValueError("give either data_path (captioned data) or instance_data_dir (DreamBooth), not both")
    for name in ("validation_split", "validation_data_path"):
        if getattr(opts, name):
            raise ValueError(f"{name} does not work with DreamBooth yet")
    if opts.dataset_config:
        for name in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt"):
            if getattr(opts, name):
                raise ValueError(
                    f"give {name} or dataset_config, not both (the dataset config's subsets are the instance images, "
                    "its is_reg = true subsets the class images, captioned by sidecars or class_tokens)"
                )
        return
    if not opts.instance_prompt.strip():
        raise ValueError("instance_data_dir needs instance_prompt (the caption with the subject's token)")
    if opts.with_prior_preservation:
        if not opts.class_prompt.strip():
            raise ValueError("with_prior_preservation needs class_prompt (the prompt of the class images)")
        if not opts.class_data_dir:
            raise ValueError("with_prior_preservation needs class_data_dir (where the class images are, or go)")
        if opts.num_class_images < 1 or opts.sample_batch_size < 1:
            raise ValueError("num_class_images and sample_batch_size must be >= 1")
    elif opts.class_data_dir or opts.class_prompt:
        LOGGER.warning("class_data_dir/class_prompt are unused without with_prior_preservation")


def dreambooth_config_records(opts: TrainOptions) -> tuple[str, list, list, list[CaptionRules]]:
    """``(dataset config, instance records, class records, caption rules per subset)``: the subsets of
    ``dataset_config`` without ``is_reg``, then those with ``is_reg = true``; a config lacking either is refused."""
    halves = []
    for is_reg in (False, True):
        folder = dataclasses.replace(folder_options(opts), is_reg=is_reg)
        label, records, rules = read_records("", folder, caption_rules(opts))
        halves.append(records)
    return label, halves[0], halves[1], rules


def lora_variant(opts: TrainOptions, source: str = "TrainOptions") -> str:
    """The adapter kind to train (``use_dora`` read as ``lora_type: dora``); a negative ``conv_rank``, or
    ``conv_alpha`` without it, is a :class:`ConfigError` naming the options."""
    if opts.conv_rank < 0:
        raise ConfigError(f"{source}: conv_rank must be >= 0 (0: no conv LoRA), got {opts.conv_rank}")
    if opts.conv_alpha is not None and not opts.conv_rank:
        raise ConfigError(f"{source}: conv_alpha is set but conv_rank is 0 (conv LoRA off); set conv_rank too")
    return "dora" if opts.use_dora else opts.lora_type


def precision_policy(opts: TrainOptions) -> PrecisionPolicy:
    """The run's precision policy (``use_fp16`` read as ``precision: fp16``); a conflict is a ValueError."""
    return resolve_policy(opts.precision, opts.vae_precision, opts.text_encoder_precision, opts.use_fp16)


def loss_scaler_of(opts: TrainOptions) -> str:
    """``loss_scaler_type`` as given, else the precision's default (dynamic for an fp16 UNet, none otherwise)."""
    return opts.loss_scaler_type or default_loss_scaler(precision_policy(opts))


def check_paths(opts: TrainOptions) -> None:
    """The input paths exist, the data index (or kohya folder, or dataset config, or DreamBooth's instance folder)
    parses, the bucket and caption options are valid and the output folder is writable (checked before any model is
    built or file written)."""
    check_dreambooth(opts)
    if opts.instance_data_dir:
        if not Path(opts.instance_data_dir).is_dir():
            raise FileNotFoundError(f"instance_data_dir {opts.instance_data_dir}: no such folder")
    elif opts.dataset_config and opts.data_path:
        raise ValueError("give data_path or dataset_config, not both (the dataset config names its image_dir)")
    elif not opts.data_path and not opts.dataset_config:
        raise ValueError(
            "data_path is required (a folder with img_txt.csv, metadata.jsonl or kohya's layout), or dataset_config"
        )
    if opts.data_path and not Path(opts.data_path).is_dir():
        raise FileNotFoundError(f"data_path {opts.data_path}: no such folder")
    if opts.pretrained_model_path and not Path(opts.pretrained_model_path).exists():
        raise FileNotFoundError(f"pretrained_model_path {opts.pretrained_model_path}: no such file or folder")
    if opts.resume and opts.resume not in ("True", "true") and not Path(opts.resume).is_file():
        raise FileNotFoundError(f"resume {opts.resume}: no such train-state file")
    if opts.init_lora_weights and not Path(opts.init_lora_weights).exists():
        raise FileNotFoundError(f"init_lora_weights {opts.init_lora_weights}: no such file or folder")
    if opts.validation_data_path and not Path(opts.validation_data_path).is_dir():
        raise FileNotFoundError(f"validation_data_path {opts.validation_data_path}: no such folder")
    from ldm.util import check_output_folder

    if opts.instance_data_dir:
        from ldm.data.dreambooth import check_instance_prompt, scan_image_folder

        scan_image_folder(opts.instance_data_dir, "instance_data_dir")  # no images fails now
        check_instance_prompt(opts.instance_prompt, opts.class_prompt if opts.with_prior_preservation else "")
    elif is_dreambooth(opts):
        dreambooth_config_records(opts)  # a config without is_reg (or instance) subsets fails now
    else:
        read_records(opts.data_path, folder_options(opts), caption_rules(opts))  # bad data fails now
    bucket_spec(opts)
    if opts.validation_data_path:
        read_records(opts.validation_data_path, validation_folder_options(opts), caption_rules(opts))
    check_output_folder(opts.output_path, "output_path")


def parse_options(argv=None) -> TrainOptions:
    """Options from defaults < ``--train_config`` < command line, with choices checked and a YAML's
    ``model_config`` made absolute (found next to the YAML, then as on the command line)."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    file_values = read_options_file(TrainOptions, args.train_config) if args.train_config else {}
    if file_values.get("model_config"):
        base = Path(args.train_config).parent
        file_values["model_config"] = str(find_config_file(file_values["model_config"], base))
    values, explicit = parse_over_file(parser, argv, file_values, drop=("train_config",))
    opts = TrainOptions(**values, model_config_on_command_line="model_config" in explicit)
    opts = apply_dataset_config(opts, args.train_config or "command line")
    opts = resolve_cache_options(opts, args.train_config or "command line")
    check_validation_options(opts, args.train_config or "command line")
    check_training_controls(opts, args.train_config or "command line")
    check_run_options(opts, args.train_config or "command line")
    check_dreambooth(opts)
    lora_variant(opts, args.train_config or "command line")
    precision_policy(opts)  # a use_fp16/precision conflict is reported before MindSpore starts
    return opts


def resolve_train_config(opts: TrainOptions) -> ResolvedConfig:
    """The model config of a run: ``--model_config`` given on the command line, else the config
    ``pretrained_model_path`` carries (diffusers folder or embedded), else the YAML's ``model_config``, else
    :data:`DEFAULT_MODEL_CONFIG`."""
    return resolve_model_config(
        config=opts.model_config if opts.model_config_on_command_line else None,
        checkpoint=opts.pretrained_model_path or None,
        fallback=opts.model_config or DEFAULT_MODEL_CONFIG,
    )
