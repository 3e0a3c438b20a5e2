"""Text-to-image fine-tuning run: model + LoRA (or full UNet) + data + train step + checkpoints + feedback.

``run_training(opts)`` is what ``train_text_to_image.py`` calls once the options are parsed. Files are written by
rank 0 only: ``<output>/ckpt/lora-<step>.safetensors`` (LoRA params only, EMA swapped in, rank/alpha/targets/family
in the header) or ``unet-<step>.safetensors`` for full fine-tuning, ``<output>/ckpt/train_state.safetensors`` (the
full resume state), ``metrics.jsonl`` (with the held-out ``val_loss`` of :mod:`ldm.train.validation` when a
validation set is given: a ``step`` 0 line before training, then in the lines of the steps it was measured at),
``loss.png`` and ``validation/`` grids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn

from ldm.atomic import save_image, write_text
from ldm.compile_cache import folder_listing, use_compile_cache
from ldm.data.cache_networks import cache_encoders, encode_validation_prompts, release_cached_networks
from ldm.data.kohya import read_dataset_config
from ldm.io.checkpoint import write_state_dict
from ldm.io.model_io import load_pretrained, model_family
from ldm.lora.adapter import write_adapter
from ldm.lora.any_format import read_any_adapter
from ldm.lora.interop import UNetLayout
from ldm.lora.network import inject_lora, load_adapter, lora_parameters, to_adapter
from ldm.lora.targets import TEXT_ENCODER_TARGETS, UNET_CONV3X3_TARGETS, UNET_RESBLOCK_TARGETS, UNET_TARGET_PRESETS
from ldm.memory_plan import (
    TRAINING_SWITCHES,
    TrainJob,
    apply_plan,
    available_memory,
    given_switches,
    plan_training,
)
from ldm.models.attention import plan_attention_fusion
from ldm.models.diffusion import build_model_from_config
from ldm.names import TEXT_PREFIX, UNET_PREFIX
from ldm.options import check_choices
from ldm.pipeline import GenerationSettings, Text2ImagePipeline, make_grid
from ldm.precision import check_device_supports, config_with_policy, configure_attention, store_frozen_weights_low
from ldm.train.ema import EMA
from ldm.train.losses import CachedLatents, LatentEncoder, LDMTrainLoss, NoiseSampler
from ldm.train.lr_schedules import lr_table
from ldm.train.options import (
    TrainOptions,
    apply_dataset_config,
    bucket_spec,
    caption_rules,
    check_paths,
    check_training_controls,
    check_validation_options,
    dreambooth_config_records,
    folder_options,
    is_dreambooth,
    lora_variant,
    loss_scaler_of,
    precision_policy,
    resolve_cache_options,
)
from ldm.train.plot import plot_metrics
from ldm.train.retention import prune_weights
from ldm.train.state import load_train_state, read_train_state_meta, save_train_state
from ldm.train.step import TrainStep
from ldm.train.validation import (
    ValidationSet,
    check_timesteps,
    encode_validation_set,
    evaluating,
    set_training,
    validation_records,
)

LOGGER = logging.getLogger("ldm.train")
STATE_FILE = "train_state.safetensors"
MAX_NONFINITE_STEPS = 5  # consecutive non-finite losses after which a run is stopped as diverged


class TrainingDiverged(ValueError):
    """The loss stayed NaN/infinite; the message names the steps and the last checkpoint to resume from."""


def plan_memory(opts: TrainOptions, config, buckets=None) -> TrainOptions:
    """``opts`` with the memory plan's choice (``ldm.memory_plan``) for each of ``mode``, ``use_recompute``,
    ``memory_efficient_attention`` and ``attention_slice_size`` left unset, logged in one line."""
    policy = precision_policy(opts)
    width, height = buckets.resolution if buckets is not None else (opts.image_size, opts.image_size)
    job = TrainJob(
        batch=opts.train_batch_size * (2 if opts.with_prior_preservation else 1),  # DreamBooth: instance + class rows
        height=height,
        width=width,
        precision=policy.unet,
        vae_precision=policy.vae,
        text_precision=policy.text_encoder,
        use_lora=opts.use_lora,
        lora_rank=opts.lora_rank,
        lora_targets=opts.lora_targets,
        lora_ft_text_encoder=opts.lora_ft_text_encoder,
        cache_latents=opts.cache_latents,
        cache_text_embeddings=opts.cache_text_embeddings,
        use_ema=opts.use_ema,
        grad_accum=opts.gradient_accumulation_steps,
        device_target=opts.device_target,
    )
    given = given_switches(opts, TRAINING_SWITCHES)
    decision = plan_training(config, job, given, *available_memory(opts.device_target, opts.max_memory_gib))
    (LOGGER.info if decision.fits else LOGGER.warning)("%s", decision.log_line())
    return apply_plan(opts, decision)


def build_trainable_model(opts: TrainOptions, config):
    """The LatentDiffusion with pretrained weights and LoRA injected (or the UNet unfrozen); returns (model, params).

    The precision policy builds each network in its compute dtype; after the trainable set is chosen, frozen
    Dense/Conv weights of low-precision networks are stored in that dtype while trainable ones stay float32.
    LoRA branches compute in fp16 under an fp16 network (or with ``lora_fp16``), their parameters in float32."""
    check_choices(opts)
    policy = precision_policy(opts)
    model = build_model_from_config(config_with_policy(config, policy), uninitialised=bool(opts.pretrained_model_path))
    if opts.pretrained_model_path:
        load_pretrained(model, opts.pretrained_model_path, allow_pickle=opts.allow_pickle)
    else:
        LOGGER.warning("no pretrained_model_path: training from random weights (only useful for smoke tests)")
    if opts.use_lora:
        dora = lora_variant(opts) == "dora"

        def lora_kwargs(precision: str) -> dict:
            fp16 = opts.lora_fp16 or precision == "fp16"
            dtype = ms.float16 if fp16 else ms.float32
            return {
                "rank": opts.lora_rank,
                "alpha": opts.lora_alpha,
                "dropout": opts.lora_dropout,
                "lora_dtype": dtype,
                "use_dora": dora,
            }

        if opts.lora_ft_text_encoder:
            inject_lora(model.cond_stage_model, targets=TEXT_ENCODER_TARGETS, **lora_kwargs(policy.text_encoder))
        unet_kwargs = lora_kwargs(policy.unet)
        conv = opts.conv_rank > 0
        inject_lora(model.model, targets=UNET_TARGET_PRESETS[opts.lora_targets], convolutions=conv, **unet_kwargs)
        if conv:  # LoCon, with kohya's module set
            inject_lora(model.model, targets=UNET_RESBLOCK_TARGETS, convolutions=True, **unet_kwargs)
            conv_kwargs = {**unet_kwargs, "rank": opts.conv_rank, "alpha": opts.conv_alpha}
            inject_lora(model.model, targets=UNET_CONV3X3_TARGETS, convolutions=True, **conv_kwargs)
        if opts.init_lora_weights:
            load_init_adapter(model, opts.init_lora_weights, config)
        if opts.fuse_lora_projections:
            plan_attention_fusion(model.model)
        params = lora_parameters(model)
        chosen = {id(p) for p in params}
        for p in model.get_parameters():
            p.requires_grad = id(p) in chosen
    else:
        for p in model.get_parameters():
            p.requires_grad = p.name.startswith(UNET_PREFIX)
        params = [p for p in model.get_parameters() if p.requires_grad]
    store_frozen_weights_low(model, policy)
    return model, params


def load_init_adapter(model, path: str, config) -> None:
    """Start the injected LoRA from the adapter at ``path`` (any format ``python -m ldm.lora import`` reads): its
    weights and per-module alphas; a module or rank that does not match the run is an error naming it."""
    adapter, fmt = read_any_adapter(path, model_family(model), UNetLayout.from_config(config))
    try:
        load_adapter(model, adapter, source=path)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"init_lora_weights {path} ({fmt}): {e.args[0]}; lora_targets, lora_ft_text_encoder and lora_rank must "
            "match the adapter's modules"
        ) from None
    LOGGER.info("LoRA initialised from %s (%s)", path, fmt)


def param_lr_scales(params, opts: TrainOptions) -> list[float] | None:
    """Per-parameter learning-rate factors: ``text_encoder_lr / start_learning_rate`` for the text encoder's, 1 for
    the rest; None (one group) when ``text_encoder_lr`` is not set."""
    if opts.text_encoder_lr is None:
        return None
    ratio = opts.text_encoder_lr / opts.start_learning_rate
    return [ratio if p.name.startswith(TEXT_PREFIX) else 1.0 for p in params]


def save_weights(model, params, path: Path, opts: TrainOptions) -> None:
    """Write the trained weights atomically: the adapter (LoRA, :mod:`ldm.lora.adapter` format) or the UNet."""
    family = model_family(model)
    if opts.use_lora:
        meta = {"context_dim": model.context_dim, "parameterization": model.parameterization}
        write_adapter(path, to_adapter(model, family, **meta))
    else:
        write_state_dict(path, {p.name: p.asnumpy() for p in params}, metadata={"family": family})


def dreambooth_records(opts: TrainOptions, model, dist) -> tuple[list, list | None, list | None, str]:
    """``(instance records, class records or None, caption rules per subset or None, label)``. From a dataset config:
    its instance and ``is_reg`` subsets. From folders: ``instance_data_dir`` and, with prior preservation,
    ``class_data_dir`` topped up to ``num_class_images`` by the base model (rank 0 generates, the other ranks wait
    for its files)."""
    from ldm.data import Record
    from ldm.data.dataset import scan_dataset
    from ldm.data.dreambooth import scan_image_folder
    from ldm.train.class_images import (
        ClassImageSpec,
        ensure_class_images,
        pipeline_generator,
        wait_for_class_images,
        weights_hash,
    )

    if opts.dataset_config:
        label, instances, classes, rules = dreambooth_config_records(opts)
        return scan_dataset(label, label, instances)[0], scan_dataset(label, label, classes)[0], rules, label
    instances = scan_image_folder(opts.instance_data_dir, "instance_data_dir", opts.instance_prompt)
    if not opts.with_prior_preservation:
        return instances, None, None, opts.instance_data_dir
    spec = ClassImageSpec(opts.class_prompt, opts.seed, weights_hash(model), opts.image_size)
    if dist.is_main:
        generate = pipeline_generator(model, spec)
        paths = ensure_class_images(opts.class_data_dir, spec, opts.num_class_images, generate, opts.sample_batch_size)
    else:
        paths = wait_for_class_images(opts.class_data_dir, spec, opts.num_class_images)
    return instances, [Record(path, (opts.class_prompt,)) for path in paths], None, opts.instance_data_dir


def training_data(opts: TrainOptions, model, dist, buckets):
    """The run's samples, read once (:class:`ldm.data.TrainingData`): DreamBooth's pairs or the captioned data."""
    from ldm.data import ImageCaptionSource, TrainingData
    from ldm.data.dreambooth import dreambooth_data

    settings = (opts.image_size, opts.seed, opts.random_crop, opts.random_flip, opts.caption_dropout)
    if is_dreambooth(opts):
        instances, classes, rules, label = dreambooth_records(opts, model, dist)
        extra = {"buckets": buckets, "subset_rules": rules, "label": label}
        return dreambooth_data(instances, classes, model.tokenize, *settings, **extra)
    source = ImageCaptionSource(
        opts.data_path,
        model.tokenize,
        opts.image_size,
        opts.random_crop,
        opts.random_flip,
        opts.caption_dropout,
        opts.seed,
        captions=caption_rules(opts),
        folder=folder_options(opts),
        buckets=buckets,
        validation_split=opts.validation_split,
    )
    return TrainingData([source])


def _validation_images(model, prompts, step: int, folder: Path, seed: int, image_size: int, contexts=None) -> None:

    pipe = Text2ImagePipeline(model, sampler="dpm_solver_pp")
    if contexts:  # encoded before the text encoder was released
        pipe.contexts.update(contexts)
    settings = GenerationSettings(steps=20, scale=7.5, height=image_size, width=image_size)
    images = pipe(list(prompts), settings=settings, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_image(folder / f"step-{step:06d}.png", make_grid(images))


@dataclass
class TrainRun:
    """Everything the loop needs, built by :func:`set_up_run`: the model, the train step and its schedule, the
    data (already positioned after the resumed micro-steps), the noise stream and where files go."""

    opts: TrainOptions
    dist: Any
    model: Any
    params: list
    step: TrainStep
    lrs: np.ndarray
    ema: EMA | None
    noise: NoiseSampler
    encode_latents: nn.Cell
    data: Any
    micro_total: int
    done: int
    out: Path
    ckpt_dir: Path
    metrics_path: Path
    prompt_contexts: dict | None
    bucket_order: str | None = None  # digest of every record's bucket, saved with the data position
    validation: ValidationSet | None = None
    loss_net: Any = None

    @property
    def validating(self) -> bool:
        return bool(self.opts.validation_steps and self.opts.validation_prompts)


def resume_state_path(opts: TrainOptions) -> Path:
    """The train-state file ``--resume`` names (``True``: the one under ``<output_path>/ckpt``)."""
    return Path(opts.output_path) / "ckpt" / STATE_FILE if opts.resume in ("True", "true") else Path(opts.resume)


def graph_inputs(opts: TrainOptions, config, buckets) -> dict:
    """What decides the run's compiled graphs and their order beside the options (the compile cache's key): the
    resolved model config, the resumed position (a resumed run meets its shapes in another order), and with
    buckets the image files and dataset config that the bucket shapes come from."""
    from omegaconf import OmegaConf

    inputs: dict[str, Any] = {"model_config": OmegaConf.to_container(OmegaConf.create(config), resolve=True)}
    state = resume_state_path(opts) if opts.resume else None
    if state is not None and state.is_file():
        inputs["resume_position"] = read_train_state_meta(str(state)).get("data_position")
    if buckets is not None or opts.instance_data_dir:
        folders = [opts.data_path, opts.validation_data_path, opts.instance_data_dir, opts.class_data_dir]
        if opts.dataset_config:
            folders += [s.image_dir for s in read_dataset_config(opts.dataset_config).subsets]
            inputs["dataset_config"] = Path(opts.dataset_config).read_text(errors="replace")
        inputs["files"] = {f: folder_listing(f) for f in folders if f}
    return inputs


def set_up_run(opts: TrainOptions, config) -> TrainRun:
    """Check the options, start MindSpore, build the trainable model and the step, restore a resumed state and
    build the data (caching through the frozen encoders, which are then released)."""
    from ldm.data import RunOrder, build_pipeline
    from ldm.env import init_env

    opts = apply_dataset_config(opts)
    check_paths(opts)
    check_validation_options(opts)
    check_training_controls(opts)
    opts = resolve_cache_options(opts)
    buckets = bucket_spec(opts)
    opts = plan_memory(opts, config, buckets)
    dist = init_env(opts.device_target, opts.mode, opts.jit_level, seed=opts.seed, distributed=opts.use_parallel)
    use_compile_cache(opts.compile_cache, opts.mode, "train", opts, graph_inputs(opts, config, buckets), dist.rank)
    policy = precision_policy(opts)
    check_device_supports(policy)
    out = Path(opts.output_path)
    ckpt_dir = out / "ckpt"
    model, params = build_trainable_model(opts, config)
    LOGGER.info("precision: %s; loss scaling %s", policy.describe(), loss_scaler_of(opts))
    configure_attention(model.model.diffusion_model, opts.enable_flash_attention, warn=LOGGER.warning)
    if opts.use_recompute:
        model.model.diffusion_model.enable_recompute()
    model.model.diffusion_model.set_attention_slice_size(opts.attention_slice_size)
    model.model.diffusion_model.set_memory_efficient_attention(opts.memory_efficient_attention)
    set_training(model, opts.lora_ft_text_encoder)
    step_px = model.latent_factor * model.unet_factor
    if opts.image_size % step_px:
        raise ValueError(f"image_size {opts.image_size} must be a multiple of {step_px}")
    if buckets is not None and buckets.steps % step_px:
        raise ValueError(f"bucket_reso_steps {buckets.steps} must be a multiple of {step_px} for this model")

    samples = training_data(opts, model, dist, buckets)
    order = RunOrder(opts.train_batch_size, seed=opts.seed, rank=dist.rank, world_size=dist.world_size)
    first_epoch = samples.sampler(order)
    bucket_order = getattr(first_epoch, "digest", None)  # the bucket order's digest, with buckets only
    if samples.bucket_table is not None and dist.is_main:
        counted = "instance/class pairs" if is_dreambooth(opts) else "images counted with their repeats"
        LOGGER.info("aspect-ratio buckets (%s):\n%s", counted, samples.bucket_table)
    steps_per_epoch = first_epoch.per_rank // opts.train_batch_size
    micro_total = opts.max_train_steps * opts.gradient_accumulation_steps or steps_per_epoch * opts.epochs
    epochs = -(-micro_total // steps_per_epoch)
    updates_total = max(micro_total // opts.gradient_accumulation_steps, 1)
    lrs = lr_table(opts.scheduler, opts.start_learning_rate, updates_total, opts.warmup_steps, opts.end_learning_rate)

    ema = EMA(params, opts.ema_decay, opts.ema_warmup_steps) if opts.use_ema else None
    encode_latents = CachedLatents(model) if opts.cache_latents else LatentEncoder(model)
    prior_weight = opts.prior_loss_weight if opts.with_prior_preservation else None
    loss_net = LDMTrainLoss(model, opts.snr_gamma, opts.noise_offset, opts.lora_ft_text_encoder, prior_weight)
    step = TrainStep(
        loss_net,
        params,
        lrs,
        betas=tuple(opts.betas),
        eps=opts.adam_epsilon,
        weight_decay=opts.weight_decay,
        lr_scales=param_lr_scales(params, opts),
        grad_accum_steps=opts.gradient_accumulation_steps,
        max_grad_norm=opts.max_grad_norm if opts.clip_grad else None,
        loss_scaler=loss_scaler_of(opts),
        init_scale=opts.init_loss_scale,
        scale_factor=opts.loss_scale_factor,
        scale_window=opts.scale_window,
        ema=ema,
        jit=opts.mode == 0,
    )
    # One noise stream for all ranks: each draws the global batch's noise and keeps its rows (see _rank_rows), so
    # N ranks x B reproduce 1 rank x N*B, and every rank can resume from rank 0's saved sampler state.
    noise = NoiseSampler(opts.seed, model.num_timesteps)
    done = 0
    if opts.resume:
        state_path = resume_state_path(opts)
        if not state_path.is_file():
            raise FileNotFoundError(f"resume: no train state at {state_path}")
        meta = load_train_state(str(state_path), step, noise)
        done = int(meta["data_position"]["batches_done"])
        saved_order = meta["data_position"].get("bucket_order")
        if saved_order != bucket_order:
            raise ValueError(
                f"resume: {state_path} was saved with bucket order {saved_order}, this run's data and bucket options "
                f"give {bucket_order}; the remaining batches would differ (same data and options, please)"
            )
        LOGGER.info("resumed from %s at micro-step %d", state_path, done)

    validating = bool(opts.validation_steps and opts.validation_prompts)
    validation = _validation_set(model, opts) if dist.is_main else None
    encoders = cache_encoders(model, opts)
    prompt_contexts = None
    if opts.cache_text_embeddings and validating:
        prompt_contexts = encode_validation_prompts(model, opts.validation_prompts)
    order = dataclasses.replace(order, num_epochs=epochs, batches_done=done)
    data = build_pipeline(samples, order, opts.num_workers, cache=encoders)
    if encoders is not None:
        del encoders
        release_cached_networks(model, opts, validating)
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if dist.is_main and opts.resume:
        _trim_metrics(metrics_path, done)
    return TrainRun(
        opts=opts,
        dist=dist,
        model=model,
        params=params,
        step=step,
        lrs=lrs,
        ema=ema,
        noise=noise,
        encode_latents=encode_latents,
        data=data,
        micro_total=micro_total,
        done=done,
        out=out,
        ckpt_dir=ckpt_dir,
        metrics_path=metrics_path,
        prompt_contexts=prompt_contexts,
        bucket_order=bucket_order,
        validation=validation,
        loss_net=loss_net,
    )


def _validation_set(model, opts: TrainOptions) -> ValidationSet | None:
    """The fixed validation-loss inputs, encoded now (before the frozen encoders may be released), or None."""
    if not (opts.validation_data_path or opts.validation_split):
        return None
    timesteps = check_timesteps(opts.validation_loss_timesteps, model.num_timesteps)
    folder, records = validation_records(opts)
    validation = encode_validation_set(model, records, opts.image_size, opts.lora_ft_text_encoder, timesteps, opts.seed)
    LOGGER.info("validation loss: %d images of %s x timesteps %s", len(records), folder, timesteps)
    return validation


def validation_loss(run: TrainRun) -> float:
    """The held-out loss of the weights now (the EMA weights, which are the ones saved, when the run keeps one)."""
    if run.ema is not None:
        run.ema.swap_in()
    try:
        with evaluating(run.model, run.opts.lora_ft_text_encoder):
            return run.validation.loss(run.loss_net, run.opts.train_batch_size)
    finally:
        if run.ema is not None:
            run.ema.swap_out()


def train_loop(run: TrainRun) -> float:
    """Run the micro-steps left (logging, periodic checkpoints and validation grids on rank 0); returns the last
    loss. Stops with :class:`TrainingDiverged` after ``MAX_NONFINITE_STEPS`` non-finite losses in a row."""
    from tqdm import tqdm

    from ldm.data.dreambooth import instance_then_class

    opts, dist, model = run.opts, run.dist, run.model
    pairs = 2 if opts.with_prior_preservation else 1  # DreamBooth: each sample is an instance and a class image
    bar = tqdm(total=run.micro_total, initial=run.done, disable=not dist.is_main, desc="train", unit="step")
    last_loss = float("nan")
    nonfinite: list[int] = []
    val_loss = None
    if run.validation is not None and run.done == 0:
        val_loss = validation_loss(run)
        _append_metrics(run.metrics_path, {"step": 0, "val_loss": val_loss})
    t_prev = time.perf_counter()
    for images, tokens in run.data.create_tuple_iterator(num_epochs=1, output_numpy=True):
        if run.done >= run.micro_total:
            break
        # every rank's batch is from one bucket at each step, so the global draw has one latent shape
        height, width = (side * model.latent_factor if opts.cache_latents else side for side in images.shape[-2:])
        shape = (opts.train_batch_size * dist.world_size * pairs, model.channels)
        shape += (height // model.latent_factor, width // model.latent_factor)
        t, eps, offset = _rank_rows(run.noise.draw(shape), dist, pairs)
        (post_noise,) = _rank_rows([run.noise.normal(shape)], dist, pairs)
        if pairs == 2:
            images, tokens = instance_then_class(images), instance_then_class(tokens)
        x0 = run.encode_latents(ms.Tensor(images), post_noise)  # images: posterior moments with cache_latents
        if opts.lora_ft_text_encoder or opts.cache_text_embeddings:  # tokens: contexts with cache_text_embeddings
            text = ms.Tensor(tokens)
        else:
            text = model.get_learned_conditioning(ms.Tensor(tokens))
        result = run.step(x0, text, t, eps, offset)
        run.done += 1
        done = run.done
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        last_loss = result.loss
        nonfinite = [*nonfinite, done] if not np.isfinite(last_loss) else []
        update = run.step.step
        lr = float(run.lrs[min(max(update - 1, 0), len(run.lrs) - 1)])
        if dist.is_main:
            record = {}
            if run.validation is not None and _validation_due(opts, done, run.micro_total):
                val_loss = record["val_loss"] = validation_loss(run)
            bar.set_postfix(
                loss=f"{last_loss:.4f}",
                **{name.split("_")[0]: f"{value:.4f}" for name, value in result.parts.items()},
                lr=f"{lr:.2e}",
                s_step=f"{dt:.2f}",
                img_s=f"{opts.train_batch_size * dist.world_size / dt:.1f}",
                **({} if val_loss is None else {"val_loss": f"{val_loss:.4f}"}),
            )
            bar.update(1)
            _append_metrics(
                run.metrics_path,
                {
                    "step": done,
                    "update": update,
                    "loss": last_loss,
                    **result.parts,
                    "lr": lr,
                    "overflow": bool(result.overflow),
                    "loss_scale": result.scale,
                    "grad_norm": result.grad_norm,
                    "step_time_s": dt,
                    "peak_rss_gib": _peak_rss_gib(),
                    **({"bucket": f"{width}x{height}"} if opts.enable_bucket else {}),
                    **record,
                },
            )
            boundary = done % opts.gradient_accumulation_steps == 0
            if opts.ckpt_save_interval and boundary and done % opts.ckpt_save_interval == 0 and done < run.micro_total:
                _checkpoint(model, run.params, run.step, run.noise, run.ema, done, run.ckpt_dir, opts, run.bucket_order)
            if run.validating and done % opts.validation_steps == 0:
                prompts, grids = opts.validation_prompts, run.out / "validation"
                _validation_images(model, prompts, done, grids, opts.seed, opts.image_size, run.prompt_contexts)
        if nonfinite:
            LOGGER.warning("step %d: loss is %s; the update is skipped (weights unchanged)", done, last_loss)
        if len(nonfinite) >= MAX_NONFINITE_STEPS:
            bar.close()
            state = run.ckpt_dir / STATE_FILE
            resume = (
                f"the last checkpoint is {state}, resume with --resume True" if state.is_file() else "no checkpoint"
            )
            raise TrainingDiverged(
                f"loss is NaN or infinite at steps {nonfinite[0]}..{nonfinite[-1]}; training stopped without "
                f"saving ({resume}); check the data, the base weights and the learning rate"
            )
    bar.close()
    return last_loss


def finish_run(run: TrainRun, last_loss: float) -> dict:
    """Write the final weights and train state and draw the loss plot (rank 0); returns the run's summary."""
    summary = {"steps": run.done, "last_loss": last_loss}
    if run.dist.is_main:
        path = _checkpoint(
            run.model, run.params, run.step, run.noise, run.ema, run.done, run.ckpt_dir, run.opts, run.bucket_order
        )
        summary["weights"] = str(path)
        plot_metrics(run.metrics_path, run.out / "loss.png")
        summary.update({"metrics": str(run.metrics_path), "loss_plot": str(run.out / "loss.png")})
    return summary


def run_training(opts: TrainOptions, config) -> dict:
    """Train; returns a summary dict (final step, last loss, paths)."""
    run = set_up_run(opts, config)
    return finish_run(run, train_loop(run))


def _validation_due(opts: TrainOptions, done: int, micro_total: int) -> bool:
    """Whether the validation loss is measured after micro-step ``done``: every ``validation_loss_steps`` at an
    update boundary, and after the last step."""
    if done == micro_total:
        return True
    every = opts.validation_loss_steps
    return bool(every) and done % opts.gradient_accumulation_steps == 0 and done % every == 0


def _append_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to ``metrics.jsonl`` (a kill can tear the last line; resume drops it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, done: int) -> None:
    """Keep the metrics of steps ``<= done`` (a resumed run logs later steps again) and drop a line torn by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", done + 1) <= done:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB; ``ru_maxrss`` is in KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _rank_rows(draws, dist, rows_per_sample: int = 1) -> list:
    """This rank's rows of global-batch draws: the sampler gives rank r the samples ``order[r::world_size]``, and
    the global draw holds ``rows_per_sample`` consecutive rows per sample at global batch position i. Rows come
    back sample-major, or with 2 rows per sample (DreamBooth pairs) each sample's first rows, then their second
    rows, the order of :func:`ldm.data.dreambooth.instance_then_class`."""
    if dist.world_size == 1 and rows_per_sample == 1:
        return list(draws)
    out = []
    for d in draws:
        a = d.asnumpy()
        mine = a.reshape(-1, rows_per_sample, *a.shape[1:])[dist.rank :: dist.world_size]
        out.append(ms.Tensor(np.ascontiguousarray(mine.swapaxes(0, 1)).reshape(-1, *a.shape[1:])))
    return out


def _checkpoint(
    model, params, step, noise, ema, done, ckpt_dir: Path, opts: TrainOptions, bucket_order: str | None = None
) -> Path:
    """Weights (EMA swapped in) + full resume state; both atomic. The data position is the micro-steps done, plus
    the bucket order's digest with buckets (a resume checks it). Then, with ``checkpoints_total_limit``, the oldest
    weight files beyond the limit are deleted, never the one the train state points to."""
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
        str(ckpt_dir / STATE_FILE),
        step,
        noise,
        data_position={"batches_done": done, **({"bucket_order": bucket_order} if bucket_order else {})},
        extra={"weights": name},
    )
    if opts.checkpoints_total_limit:
        needed = read_train_state_meta(str(ckpt_dir / STATE_FILE))["extra"].get("weights")
        prune_weights(ckpt_dir, opts.checkpoints_total_limit, needed)
    return path
