"""Text-to-image fine-tuning run: model + LoRA (or full UNet) + data + compiled step + checkpoints + feedback.

``run_training(opts)`` is what ``train_text_to_image.py`` calls once the options are parsed. Files are written by
rank 0 only: ``<output>/ckpt/lora-<step>.safetensors`` (LoRA params only, EMA swapped in, rank/alpha/targets/family
in the header) or ``unet-<step>.safetensors`` for full fine-tuning, ``<output>/ckpt/train_state.safetensors`` (the
full resume state), ``metrics.jsonl``, ``loss.png`` and ``validation/`` grids.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
from mindspore import nn, ops

from ldm.io.checkpoint import write_state_dict
from ldm.io.model_io import load_pretrained, model_family
from ldm.lora import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    UNET_EXTENDED_TARGETS,
    inject_lora,
    lora_metadata,
    lora_state_dict,
)
from ldm.models.diffusion import build_model_from_config
from ldm.train.ema import EMA
from ldm.train.losses import DiffusionLoss, NoiseSampler
from ldm.train.lr_schedules import lr_table
from ldm.train.plot import plot_metrics
from ldm.train.state import load_train_state, save_train_state
from ldm.train.step import TrainStep

LOGGER = logging.getLogger("ldm.train")
LORA_TARGET_PRESETS = {"attention": UNET_ATTENTION_TARGETS, "extended": UNET_EXTENDED_TARGETS}
STATE_FILE = "train_state.safetensors"


@dataclass
class TrainOptions:
    """Every option of a run; the CLI fills it from defaults < YAML < command line."""

    data_path: str = ""
    output_path: str = "output"
    model_config: str = "configs/v2-inference.yaml"
    pretrained_model_path: str = ""
    allow_pickle: bool = False
    device_target: str = "CPU"
    mode: int = 0
    jit_level: str | None = None
    use_parallel: bool = False
    seed: int = 3407
    image_size: int = 512
    random_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0
    num_workers: int = 1
    train_batch_size: int = 1
    epochs: int = 10
    max_train_steps: int = 0
    gradient_accumulation_steps: int = 1
    start_learning_rate: float = 1e-4
    end_learning_rate: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int = 0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    clip_grad: bool = True
    max_grad_norm: float = 1.0
    loss_scaler_type: str = "none"
    init_loss_scale: float = 65536.0
    loss_scale_factor: int = 2
    scale_window: int = 1000
    use_ema: bool = False
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 2000
    use_lora: bool = True
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_fp16: bool = False
    lora_targets: str = "attention"
    lora_ft_text_encoder: bool = False
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    ckpt_save_interval: int = 0
    resume: str = ""
    validation_prompts: list = field(default_factory=list)
    validation_steps: int = 0
    log_interval: int = 10


class LDMTrainLoss(nn.Cell):
    """Frozen VAE encode + text encode, then the diffusion loss of the (LoRA-)UNet; no gradient to the frozen parts."""

    def __init__(self, ldm, snr_gamma, noise_offset):
        super().__init__(auto_prefix=False)
        self.ldm = ldm
        self.loss = DiffusionLoss(ldm.model, ldm.alphas_cumprod, ldm.parameterization, snr_gamma, noise_offset)

    def construct(self, images, token_ids, post_noise, t, noise, offset):
        mean, logvar = self.ldm.encode_first_stage(images)
        x0 = ops.stop_gradient(self.ldm.get_first_stage_encoding(mean, logvar, post_noise))
        context = self.ldm.get_learned_conditioning(token_ids)
        return self.loss(x0, context, t, noise, offset)


def _check_paths(opts: TrainOptions) -> None:
    if not opts.data_path:
        raise ValueError("data_path is required (a folder with img_txt.csv or metadata.jsonl)")
    if not Path(opts.data_path).is_dir():
        raise FileNotFoundError(f"data_path {opts.data_path}: no such folder")
    if opts.pretrained_model_path and not Path(opts.pretrained_model_path).exists():
        raise FileNotFoundError(f"pretrained_model_path {opts.pretrained_model_path}: no such file or folder")
    if opts.resume and opts.resume not in ("True", "true") and not Path(opts.resume).is_file():
        raise FileNotFoundError(f"resume {opts.resume}: no such train-state file")


def build_trainable_model(opts: TrainOptions, config):
    """The LatentDiffusion with pretrained weights and LoRA injected (or the UNet unfrozen); returns (model, params)."""
    model = build_model_from_config(config)
    if opts.pretrained_model_path:
        load_pretrained(model, opts.pretrained_model_path, allow_pickle=opts.allow_pickle)
    else:
        LOGGER.warning("no pretrained_model_path: training from random weights (only useful for smoke tests)")
    if opts.use_lora:
        if opts.lora_targets not in LORA_TARGET_PRESETS:
            raise ValueError(f"lora_targets must be one of {sorted(LORA_TARGET_PRESETS)}, got {opts.lora_targets!r}")
        kwargs = {
            "rank": opts.lora_rank,
            "alpha": opts.lora_alpha,
            "dropout": opts.lora_dropout,
            "lora_dtype": ms.float16 if opts.lora_fp16 else ms.float32,
        }
        if opts.lora_ft_text_encoder:
            inject_lora(model.cond_stage_model, targets=TEXT_ENCODER_TARGETS, **kwargs)
        inject_lora(model.model, targets=LORA_TARGET_PRESETS[opts.lora_targets], **kwargs)
        params = [p for p in model.get_parameters() if ".lora_down." in p.name or ".lora_up." in p.name]
        chosen = {id(p) for p in params}
        for p in model.get_parameters():
            p.requires_grad = id(p) in chosen
    else:
        for p in model.get_parameters():
            p.requires_grad = p.name.startswith("model.diffusion_model.")
        params = [p for p in model.get_parameters() if p.requires_grad]
    return model, params


def save_weights(model, params, path: Path, opts: TrainOptions) -> None:
    """Write the trained weights atomically: the adapter (LoRA) or the UNet (full fine-tuning)."""
    if opts.use_lora:
        state = lora_state_dict(model)
        family = model_family(model)
        meta = lora_metadata(model, family=family)
        meta["ldm_lora"] = json.dumps(
            {
                "rank": opts.lora_rank,
                "alpha": opts.lora_alpha or opts.lora_rank,
                "family": family,
                "targets": json.loads(meta["lora.targets"]),
                "context_dim": model.context_dim,
                "parameterization": model.parameterization,
                "text_encoder": bool(opts.lora_ft_text_encoder),
            }
        )
        write_state_dict(path, state, metadata=meta)
    else:
        write_state_dict(path, {p.name: p.asnumpy() for p in params}, metadata={"family": model_family(model)})


def _validation_images(model, prompts, step: int, folder: Path, seed: int, image_size: int) -> None:
    from PIL import Image

    from ldm.pipeline import GenerationSettings, Text2ImagePipeline, make_grid

    pipe = Text2ImagePipeline(model, sampler="dpm_solver_pp")
    settings = GenerationSettings(steps=20, scale=7.5, height=image_size, width=image_size)
    images = pipe(list(prompts), settings=settings, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images)).save(folder / f"step-{step:06d}.png")


def run_training(opts: TrainOptions, config) -> dict:
    """Train; returns a summary dict (final step, last loss, paths)."""
    from tqdm import tqdm

    from ldm.data import build_dataset
    from ldm.env import init_env

    _check_paths(opts)
    dist = init_env(opts.device_target, opts.mode, opts.jit_level, seed=opts.seed, distributed=opts.use_parallel)
    out = Path(opts.output_path)
    ckpt_dir = out / "ckpt"
    model, params = build_trainable_model(opts, config)
    latent = opts.image_size // model.latent_factor
    if opts.image_size % (model.latent_factor * model.unet_factor):
        step_px = model.latent_factor * model.unet_factor
        raise ValueError(f"image_size {opts.image_size} must be a multiple of {step_px}")

    probe = build_dataset(
        opts.data_path,
        model.tokenize,
        opts.image_size,
        opts.train_batch_size,
        seed=opts.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_epochs=1,
    )
    steps_per_epoch = probe.get_dataset_size()
    if steps_per_epoch == 0:
        raise ValueError(f"data_path {opts.data_path}: fewer images than one global batch")
    micro_total = opts.max_train_steps * opts.gradient_accumulation_steps or steps_per_epoch * opts.epochs
    epochs = -(-micro_total // steps_per_epoch)
    updates_total = max(micro_total // opts.gradient_accumulation_steps, 1)
    lrs = lr_table(opts.scheduler, opts.start_learning_rate, updates_total, opts.warmup_steps, opts.end_learning_rate)

    ema = EMA(params, opts.ema_decay, opts.ema_warmup_steps) if opts.use_ema else None
    loss_net = LDMTrainLoss(model, opts.snr_gamma, opts.noise_offset)
    step = TrainStep(
        loss_net,
        params,
        lrs,
        betas=tuple(opts.betas),
        eps=opts.adam_epsilon,
        weight_decay=opts.weight_decay,
        grad_accum_steps=opts.gradient_accumulation_steps,
        max_grad_norm=opts.max_grad_norm if opts.clip_grad else None,
        loss_scaler=opts.loss_scaler_type,
        init_scale=opts.init_loss_scale,
        scale_factor=opts.loss_scale_factor,
        scale_window=opts.scale_window,
        ema=ema,
    )
    # One noise stream for all ranks: each draws the global batch's noise and keeps its rows (see _rank_rows), so
    # N ranks x B reproduce 1 rank x N*B, and every rank can resume from rank 0's saved sampler state.
    noise = NoiseSampler(opts.seed, model.num_timesteps)
    done = 0
    if opts.resume:
        state_path = ckpt_dir / STATE_FILE if opts.resume in ("True", "true") else Path(opts.resume)
        if not state_path.is_file():
            raise FileNotFoundError(f"resume: no train state at {state_path}")
        meta = load_train_state(str(state_path), step, noise)
        done = int(meta["data_position"]["batches_done"])
        LOGGER.info("resumed from %s at micro-step %d", state_path, done)

    data = build_dataset(
        opts.data_path,
        model.tokenize,
        opts.image_size,
        opts.train_batch_size,
        seed=opts.seed,
        random_crop=opts.random_crop,
        flip=opts.random_flip,
        caption_dropout=opts.caption_dropout,
        num_workers=opts.num_workers,
        rank=dist.rank,
        world_size=dist.world_size,
        num_epochs=epochs,
        batches_done=done,
    )
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    losses: list[tuple[int, float]] = []
    shape = (opts.train_batch_size * dist.world_size, model.channels, latent, latent)
    bar = tqdm(total=micro_total, initial=done, disable=not dist.is_main, desc="train", unit="step")
    last_loss = float("nan")
    t_prev = time.perf_counter()
    for images, tokens in data.create_tuple_iterator(num_epochs=1, output_numpy=True):
        if done >= micro_total:
            break
        t, eps, offset = _rank_rows(noise.draw(shape), dist)
        (post_noise,) = _rank_rows([noise.normal(shape)], dist)
        result = step(ms.Tensor(images), ms.Tensor(tokens), post_noise, t, eps, offset)
        done += 1
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        last_loss = result.loss
        update = step.step
        lr = float(lrs[min(max(update - 1, 0), len(lrs) - 1)])
        if dist.is_main:
            losses.append((done, last_loss))
            bar.set_postfix(
                loss=f"{last_loss:.4f}",
                lr=f"{lr:.2e}",
                s_step=f"{dt:.2f}",
                img_s=f"{opts.train_batch_size * dist.world_size / dt:.1f}",
            )
            bar.update(1)
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "step": done,
                            "update": update,
                            "loss": last_loss,
                            "lr": lr,
                            "overflow": bool(result.overflow),
                            "loss_scale": result.scale,
                            "grad_norm": result.grad_norm,
                            "step_time_s": dt,
                        }
                    )
                    + "\n"
                )
            boundary = done % opts.gradient_accumulation_steps == 0
            if opts.ckpt_save_interval and boundary and done % opts.ckpt_save_interval == 0 and done < micro_total:
                _checkpoint(model, params, step, noise, ema, done, ckpt_dir, opts)
            if opts.validation_steps and opts.validation_prompts and done % opts.validation_steps == 0:
                _validation_images(model, opts.validation_prompts, done, out / "validation", opts.seed, opts.image_size)
    bar.close()
    summary = {"steps": done, "last_loss": last_loss}
    if dist.is_main:
        summary["weights"] = str(_checkpoint(model, params, step, noise, ema, done, ckpt_dir, opts))
        plot_metrics(metrics_path, out / "loss.png")
        summary.update({"metrics": str(metrics_path), "loss_plot": str(out / "loss.png")})
    return summary


def _rank_rows(draws, dist) -> list:
    """This rank's rows ``rank::world_size`` of global-batch draws: the sampler gives rank r the samples
    ``order[r::world_size]``, so row i of the global draw belongs to the sample at global batch position i."""
    if dist.world_size == 1:
        return list(draws)
    return [ms.Tensor(d.asnumpy()[dist.rank :: dist.world_size]) for d in draws]


def _checkpoint(model, params, step, noise, ema, done, ckpt_dir: Path, opts: TrainOptions) -> Path:
    """Weights (EMA swapped in) + full resume state; both atomic."""
    name = ("lora" if opts.use_lora else "unet") + f"-{done:06d}.safetensors"
    path = ckpt_dir / name
    if ema is not None:
        ema.swap_in()
    try:
        save_weights(model, params, path, opts)
    finally:
        if ema is not None:
            ema.swap_out()
    save_train_state(
        str(ckpt_dir / STATE_FILE), step, noise, data_position={"batches_done": done}, extra={"weights": name}
    )
    return path
