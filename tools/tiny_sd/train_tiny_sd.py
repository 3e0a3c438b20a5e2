"""Train the tiny SD family in PyTorch: tiny CLIP -> tiny KL-VAE -> tiny SD1-style UNet, one after the other.

    python tools/tiny_sd/train_tiny_sd.py --data output/tiny_sd_data/base_train.npz --out output/tiny_sd_torch

Reads ``base_train.npz`` from ``make_data.py`` (images + token ids made with our CLIP tokenizer, so no tokenizer
files are needed here) and writes a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``) and a
transformers CLIP folder (``clip/``), which ``python -m ldm.convert`` and ``tools/eval/eval_clip_score.py`` read.

* CLIP (text + vision towers) is trained contrastively on the captions; 20% of the pairs are shown in the held-out
  concept's colours (``make_data.treat``; the concept is named in ``base_train.npz``) with its caption ("a
  blueprint drawing of ..."), so the text encoder and CLIP score know the held-out word.
* The KL-VAE is trained with L1 reconstruction + a small KL term, also on 20% held-out colours (it is the image
  codec: it must be able to represent the held-out colours before LoRA can learn them).
* The UNet (epsilon prediction, SD's scaled-linear schedule, 10% caption dropout for classifier-free guidance,
  EMA 0.999) sees only the plain clip art: the concept is held out of it.
* ``--prefix_augment P`` swaps the caption's "a clip art drawing of" for another phrasing from ``PREFIXES`` (or none)
  with probability P. Every caption otherwise starts with the same five tokens, so an unseen style word ("a blueprint
  drawing of") moves the text embedding off everything the UNet saw and it draws noise instead of the subject; real
  SD has seen thousands of phrasings and keeps the subject. The phrasings hold no colour or style word, so the
  held-out concept stays unseen. Needs the tokenizer folder (``--tokenizer``, by default ``<--init>/tokenizer``).
* ``--ground_augment P`` shows the VAE and the UNet each drawing, with probability P, on a coloured ground from
  ``GROUNDS`` (one seeded colour per drawing) with " on <colour> paper" added to its caption. Real SD has seen
  every kind of background; a UNet that saw only white ones must learn from scratch, inside a LoRA's few hundred
  updates, to move an image's whole ground, which a colour-treatment concept asks for. No ground is black or green
  and no ink is recoloured, so a held-out colour treatment such as night vision (green ink on near-black) stays
  unseen. Needs the tokenizer too. Tried once; it made the LoRA's FID drop smaller (model card, "night vision").
* ``--negative_augment P`` shows the VAE and the UNet each drawing, with probability P, as a photographic negative
  (every RGB value inverted: light, complementary-coloured ink on a black ground) with NEGATIVE_SUFFIX added to its
  caption. Real SD has seen light-on-dark images; a UNet that saw only dark ink on white has no features for them,
  and a light-on-dark style (blueprint) cannot be learnt by a LoRA's few hundred updates on top of it (model card).
  A negative is no blueprint: its ground is black, its ink keeps the drawing's (inverted) colours, and the caption
  names neither the word nor the blue. Needs the tokenizer too.

``--init DIR`` continues from an earlier run instead of starting from scratch (a diffusers folder, e.g. ``python -m
ldm.convert models/tiny_sd/tiny_sd.safetensors DIR``, plus the transformers CLIP folder as ``DIR/clip``): the UNet
training starts from ``DIR/unet``; CLIP and the VAE are taken as they are, unless ``--clip_steps`` / ``--vae_steps``
ask for more training. That is how a new held-out concept is taught to an existing family: CLIP goes on training on
the new phrase, only the VAE's decoder trains (the frozen encoder keeps the latents the UNet learned from), and the
UNet learns the new text encoder's embeddings, still without a held-out image. ``--fresh_unet`` keeps CLIP and the VAE
of ``--init`` but trains the UNet from scratch: for a held-out subject category (``make_data.py --concept flags``),
which the kept UNet has seen.

Each stage runs for a wall-clock budget: its step count is fixed after timing the first steps (and printed), and
its cosine learning-rate schedule spans exactly that many steps; ``--*_steps`` fixes a count instead. Needs torch,
diffusers and transformers; runs on CUDA when present (the committed weights were trained on one GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_data import CONCEPTS, ink, paint, treat  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HELD_OUT_RATE = 0.2
CAPTION_DROPOUT = 0.1
TIMING_STEPS = 30
PLAIN_PREFIX = "a clip art drawing of"  # make_data.CAPTION's prefix
PREFIXES = (  # what --prefix_augment puts in its place: no colour, colour treatment or style words
    "",
    "a drawing of",
    "an illustration of",
    "a picture of",
    "an image of",
    "a sketch of",
    "clip art of",
    "a clip art image of",
    "a vector image of",
    "an icon of",
    "a cartoon of",
    "a graphic of",
    "a cartoon drawing of",
    "a simple drawing of",
    "a digital drawing of",
    "a vector drawing of",
    "a flat drawing of",
    "a small drawing of",
    "a cute drawing of",
    "a nice drawing of",
)

GROUNDS = {  # what --ground_augment puts behind a drawing: no black and no green, the held-out concept's colours
    "red": (200, 45, 45),
    "orange": (240, 140, 40),
    "yellow": (240, 215, 60),
    "blue": (50, 90, 200),
    "navy": (25, 35, 90),
    "purple": (120, 55, 160),
    "pink": (240, 150, 190),
    "brown": (110, 70, 35),
    "grey": (128, 128, 128),
}
NEGATIVE_SUFFIX = "as a negative"  # what --negative_augment adds to a caption

TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
VISION = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4)
UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=TEXT["hidden_size"],
)
VAE = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    sample_size=64,
)


def log(stage: str, record: dict, history: list) -> None:
    history.append({"stage": stage, **record})
    print(json.dumps({"stage": stage, **record}), flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine to 0 over ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def run_stage(name, step_fn, optimizer, peak_lr, budget_s, fixed_steps, deadline, history, log_every=200):
    """Call ``step_fn(step) -> loss`` for a budget (step count fixed after timing steps 10..40) or a fixed step
    count; stop early, and say so, if the run's overall ``deadline`` (time.time()) passes."""
    total = fixed_steps or 10**9
    start = time.time()
    losses = []
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, peak_lr)
        losses.append(step_fn(step))
        step += 1
        if step in (10, 10 + TIMING_STEPS) and not fixed_steps:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            if step == 10:
                timed_from = time.time()
            else:
                per_step = (time.time() - timed_from) / TIMING_STEPS
                total = max(step + 1, int((budget_s - (time.time() - start)) / per_step) + step)
                log(name, {"planned_steps": total, "seconds_per_step": round(per_step, 5)}, history)
        if step % log_every == 0 or step == total:
            window = torch.stack(losses[-log_every:]).float().mean().item()
            log(name, {"step": step, "loss": round(window, 5), "seconds": round(time.time() - start, 1)}, history)
        if time.time() > deadline:
            log(name, {"stopped_early_at": step, "of_planned": total}, history)
            break
    return step, time.time() - start


def train_clip(data, device, args, history, model=None):
    """Train CLIP contrastively from scratch, or go on training ``model`` (``--init`` with ``--clip_steps``)."""
    from transformers import CLIPConfig, CLIPModel

    text_cfg = dict(TEXT, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    text_cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    config = CLIPConfig(
        text_config=text_cfg,
        vision_config=dict(VISION, num_attention_heads=4, hidden_act="quick_gelu"),
        projection_dim=64,
    )
    torch.manual_seed(args.seed)
    model = (model or CLIPModel(config)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n = data["images"].shape[0]

    def step(_):
        idx = torch.randint(0, n, (args.clip_batch,), device=device, generator=gen)
        bp = torch.rand(args.clip_batch, device=device, generator=gen) < HELD_OUT_RATE
        images = torch.where(bp.view(-1, 1, 1, 1), data["held_out"][idx], data["images"][idx])
        ids = torch.where(bp.view(-1, 1), data["held_out_ids"][idx], data["ids"][idx])
        pixels = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    steps, seconds = run_stage("clip", step, opt, 5e-4, args.clip_seconds, args.clip_steps, args.deadline, history)
    return model.eval(), steps, seconds


def train_vae(data, device, args, history, vae=None):
    """Train the KL-VAE from scratch, or only the decoder of ``vae`` (``--init`` with ``--vae_steps``): the frozen
    encoder keeps every latent the UNet learned from, while the decoder learns to draw the held-out colours."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed + 1)
    decoder_only = vae is not None
    vae = (vae or AutoencoderKL(**VAE)).to(device).train()
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    n = data["images"].shape[0]

    def step(_):
        idx = torch.randint(0, n, (args.vae_batch,), device=device, generator=gen)
        draw = torch.rand(args.vae_batch, device=device, generator=gen).view(-1, 1, 1, 1)
        images = torch.where(draw < HELD_OUT_RATE, data["held_out"][idx], data["images"][idx])
        low = HELD_OUT_RATE
        for rate, extra_images, _ in data.get("extras", ()):  # --ground/negative_augment: the codec must draw them too
            images = torch.where((draw >= low) & (draw < low + rate), extra_images[idx], images)
            low += rate
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.set_grad_enabled(not decoder_only):
                posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = (recon.float() - x).abs().mean() + F.mse_loss(recon.float(), x)
        loss = rec if decoder_only else rec + args.kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return rec.detach()

    steps, seconds = run_stage("vae", step, opt, 1e-3, args.vae_seconds, args.vae_steps, args.deadline, history)
    return vae.eval(), steps, seconds


@torch.no_grad()
def encode_all(vae, images, device, batch=512):
    """Posterior mean and std of every training image (sampled per step during UNet training)."""
    means, stds = [], []
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def caption_ends(ids: np.ndarray, eos: int) -> np.ndarray:
    """Index of each caption's EOS token (rows of token ids, BOS first, EOS-padded)."""
    return 1 + np.argmax(ids[:, 1:] == eos, axis=1)


def put_caption(row: np.ndarray, tokens: list[int], eos: int) -> None:
    """Write ``tokens`` into an EOS-filled ``row``, cut to the context and closed with EOS."""
    tokens = tokens[: len(row) - 1] + [eos]
    row[: len(tokens)] = tokens


def caption_variants(ids: np.ndarray, tokenizer_dir: str) -> np.ndarray:
    """Token ids of every caption under each phrasing: ``[0]`` the captions as they are, ``[1 + k]`` with
    ``PLAIN_PREFIX`` replaced by ``PREFIXES[k]`` (subject tokens kept, EOS padding, truncated to the context)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id

    def words(text: str) -> list[int]:
        return tokenizer(text).input_ids[1:-1]

    plain = words(PLAIN_PREFIX)
    if not (ids[:, 1 : 1 + len(plain)] == plain).all():
        raise ValueError(f"not every caption starts with {PLAIN_PREFIX!r}: data and tokenizer do not match")
    ends = caption_ends(ids, eos)
    out = np.full((1 + len(PREFIXES), *ids.shape), eos, dtype=ids.dtype)
    out[0] = ids
    for k, prefix in enumerate(PREFIXES, 1):
        head = [int(ids[0, 0]), *words(prefix)]
        for row, (caption, end) in enumerate(zip(ids, ends)):
            put_caption(out[k, row], head + caption[1 + len(plain) : end].tolist(), eos)
    return out


def with_suffixes(ids: np.ndarray, suffixes: list[list[int]], eos: int) -> np.ndarray:
    """Each caption (a row of token ids, EOS-padded) with its row's suffix tokens before the EOS token (truncated to
    the context)."""
    out = np.full_like(ids, eos)
    for row, (end, suffix) in enumerate(zip(caption_ends(ids, eos), suffixes)):
        put_caption(out[row], ids[row, :end].tolist() + suffix, eos)
    return out


def negatives(images: np.ndarray, ids: np.ndarray, tokenizer_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Every drawing as a photographic negative (255 - RGB) and its caption with NEGATIVE_SUFFIX."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    suffix = tokenizer(NEGATIVE_SUFFIX).input_ids[1:-1]
    return 255 - images, with_suffixes(ids, [suffix] * len(ids), tokenizer.eos_token_id)


def on_grounds(images: np.ndarray, ids: np.ndarray, tokenizer_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every drawing on a seeded random ground from ``GROUNDS`` (the paper shows where the drawing has no ink), and
    its caption with " on <colour> paper"."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    names = list(GROUNDS)
    choice = np.random.default_rng(seed).integers(0, len(names), len(images))
    drawing_ink = ink(images)
    grounded = np.empty_like(images)
    for k, name in enumerate(names):
        rows = choice == k
        grounded[rows] = paint(drawing_ink[rows], GROUNDS[name], images[rows])  # the drawing's own ink colours
    words = [tokenizer(f"on {name} paper").input_ids[1:-1] for name in names]
    return grounded, with_suffixes(ids, [words[k] for k in choice], tokenizer.eos_token_id)


def train_unet(data, text_encoder, latent_mean, latent_std, scale, device, args, history, extras=()):
    """``extras``: (rate, latent mean, latent std, caption ids) of each augmentation (``--ground_augment``,
    ``--negative_augment``), drawn at its rate in place of the plain drawing."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(args.seed + 2)
    if args.init and not args.fresh_unet:
        unet = UNet2DConditionModel.from_pretrained(Path(args.init) / "unet", torch_dtype=torch.float32)
        unet = unet.to(device).train()
    else:
        unet = UNet2DConditionModel(**UNET).to(device).train()
    ema = UNet2DConditionModel(**unet.config).to(device).eval()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    alphas = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    forward = torch.compile(unet) if args.compile else unet
    n = latent_mean.shape[0]
    variants = data["ids"][None]
    if args.prefix_augment:
        variants = torch.from_numpy(caption_variants(data["ids"].cpu().numpy(), args.tokenizer)).to(device)
    with torch.no_grad():  # frozen text encoder: embed every caption (under every phrasing) once
        contexts = torch.stack(
            [torch.cat([text_encoder(ids).last_hidden_state for ids in v.split(512)]) for v in variants]
        )
        empty = text_encoder(data["empty_ids"]).last_hidden_state
        extras = [
            (rate, mean, std, torch.cat([text_encoder(part).last_hidden_state for part in ids.split(512)]))
            for rate, mean, std, ids in extras
        ]

    def step(i):
        idx = torch.randint(0, n, (args.unet_batch,), device=device, generator=gen)
        mean, std = latent_mean[idx], latent_std[idx]
        context = contexts[0, idx]
        if len(contexts) > 1:  # --prefix_augment
            swap = torch.rand(args.unet_batch, device=device, generator=gen) < args.prefix_augment
            other = torch.randint(1, len(contexts), (args.unet_batch,), device=device, generator=gen)
            context = contexts[torch.where(swap, other, 0), idx]
        if extras:  # --ground_augment, --negative_augment: one draw picks plain or one augmentation
            draw, low = torch.rand(args.unet_batch, device=device, generator=gen), 0.0
            for rate, extra_mean, extra_std, extra_contexts in extras:
                pick = (draw >= low) & (draw < low + rate)
                mean = torch.where(pick.view(-1, 1, 1, 1), extra_mean[idx], mean)
                std = torch.where(pick.view(-1, 1, 1, 1), extra_std[idx], std)
                context = torch.where(pick.view(-1, 1, 1), extra_contexts[idx], context)
                low += rate
        z = (mean + std * torch.randn(mean.shape, device=device, generator=gen)) * scale
        drop = torch.rand(args.unet_batch, device=device, generator=gen) < CAPTION_DROPOUT
        context = torch.where(drop.view(-1, 1, 1), empty.expand_as(context), context)
        t = torch.randint(0, 1000, (args.unet_batch,), device=device, generator=gen)
        noise = torch.randn(z.shape, device=device, generator=gen)
        if args.noise_offset:  # a per-image, per-channel constant: lets the UNet move an image's overall colour
            noise = noise + args.noise_offset * torch.randn((*z.shape[:2], 1, 1), device=device, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = forward(noisy, t, context).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, unet_params, 1 - decay)
        return loss.detach()

    steps, seconds = run_stage(
        "unet", step, opt, args.unet_lr, args.unet_seconds, args.unet_steps, args.deadline, history
    )
    return ema, steps, seconds


@torch.no_grad()
def sample_grid(unet, vae, text_encoder, ids, empty_ids, scale, path: Path, guidance=5.0, steps=20, seed=0):
    """The UNet's samples for the first captions with diffusers' DPM-Solver++ (a check that needs no converter)."""
    from diffusers import DPMSolverMultistepScheduler
    from PIL import Image

    device = ids.device
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(steps)
    cond = text_encoder(ids).last_hidden_state
    context = torch.cat([text_encoder(empty_ids).last_hidden_state.expand_as(cond), cond])
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((ids.shape[0], 4, 16, 16), device=device, generator=gen)
    for t in sched.timesteps:
        uncond, text = unet(torch.cat([z, z]), t, context).sample.chunk(2)
        z = sched.step(uncond + guidance * (text - uncond), t, z).prev_sample
    images = ((vae.decode(z / scale).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
    Image.fromarray(torch.cat(list(images.permute(0, 2, 3, 1)), 1).cpu().numpy()).save(path)


def save_all(out: Path, clip, vae, unet, history, summary):
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out / "clip")
    text = CLIPTextModel(clip.config.text_config)
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # nested before transformers 5.2x
    text.save_pretrained(out / "text_encoder")
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(out / "scheduler")
    (out / "train_log.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="output/tiny_sd_data/base_train.npz")
    p.add_argument("--out", default="output/tiny_sd_torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N images (a quick dry run)")
    p.add_argument("--clip_seconds", type=float, default=60)
    p.add_argument("--vae_seconds", type=float, default=100)
    p.add_argument("--unet_seconds", type=float, default=300)
    p.add_argument("--clip_steps", type=int, help="fixed step count instead of --clip_seconds")
    p.add_argument("--vae_steps", type=int, help="fixed step count instead of --vae_seconds")
    p.add_argument("--unet_steps", type=int, help="fixed step count instead of --unet_seconds")
    p.add_argument("--clip_batch", type=int, default=512)
    p.add_argument("--vae_batch", type=int, default=128)
    p.add_argument("--unet_batch", type=int, default=256)
    p.add_argument("--unet_lr", type=float, default=3e-4)
    p.add_argument("--kl_weight", type=float, default=1e-4)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--max_seconds", type=float, default=1e9, help="stop any stage once the run is this old")
    p.add_argument(
        "--init",
        help="continue from this folder (vae/, text_encoder/, unet/, clip/): CLIP kept unless --clip_steps, the VAE "
        "unless --vae_steps (then its decoder alone is trained)",
    )
    p.add_argument("--fresh_unet", action="store_true", help="with --init: train the UNet from scratch")
    p.add_argument("--noise_offset", type=float, default=0.0, help="offset noise strength (0: off)")
    p.add_argument("--prefix_augment", type=float, default=0.0, help="rate of swapped caption phrasings (0: off)")
    p.add_argument("--ground_augment", type=float, default=0.0, help="rate of drawings on coloured grounds (0: off)")
    p.add_argument("--negative_augment", type=float, default=0.0, help="rate of drawings as negatives (0: off)")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder for the augmentations (default: <--init>/tokenizer)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (faster steps, ~1 min compile)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    raw = dict(np.load(args.data))
    for key in ("images", "ids", "held_out_ids"):
        raw[key] = raw[key][: args.limit]
    concept = str(raw["concept"])
    data = {k: torch.from_numpy(raw[k]).to(device) for k in ("images", "ids", "held_out_ids", "empty_ids")}
    data["ids"], data["held_out_ids"], data["empty_ids"] = (
        data[k].long() for k in ("ids", "held_out_ids", "empty_ids")
    )
    if concept in CONCEPTS:  # a colour treatment: CLIP and the VAE see it on the fly
        data["held_out"] = torch.from_numpy(treat(raw["images"], concept)).to(device)
    elif not args.init or args.clip_steps or args.vae_steps:
        raise SystemExit(f"held-out category {concept!r}: CLIP and the VAE are kept from --init (no --clip/vae_steps)")
    args.tokenizer = args.tokenizer or (args.init and str(Path(args.init) / "tokenizer"))
    if (args.prefix_augment or args.ground_augment or args.negative_augment) and not args.tokenizer:
        raise SystemExit("--prefix/ground/negative_augment need the tokenizer folder: pass --tokenizer or --init")
    extras = {}  # name -> (rate, images, caption ids)
    if args.ground_augment:
        extras["grounds"] = (args.ground_augment, *on_grounds(raw["images"], raw["ids"], args.tokenizer, args.seed + 3))
    if args.negative_augment:
        extras["negatives"] = (args.negative_augment, *negatives(raw["images"], raw["ids"], args.tokenizer))
    if HELD_OUT_RATE + sum(rate for rate, _, _ in extras.values()) > 1:
        raise SystemExit("the augmentation rates add up to more than the images left after the held-out share")
    data["extras"] = [
        (rate, torch.from_numpy(images).to(device), torch.from_numpy(ids).to(device).long())
        for rate, images, ids in extras.values()
    ]
    history: list = []
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "seed": args.seed}
    summary["images"] = int(data["images"].shape[0])
    t0 = time.time()
    args.deadline = t0 + args.max_seconds

    if args.init:
        from diffusers import AutoencoderKL
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(Path(args.init) / "clip", torch_dtype=torch.float32).to(device).eval()
        vae = AutoencoderKL.from_pretrained(Path(args.init) / "vae", torch_dtype=torch.float32).to(device).eval()
        summary.update(clip_steps=0, clip_seconds=0.0, vae_steps=0, vae_seconds=0.0)
        if args.clip_steps:  # teach the kept CLIP a new held-out word before the UNet learns its text embeddings
            clip, summary["clip_steps"], summary["clip_seconds"] = train_clip(data, device, args, history, clip)
        if args.vae_steps:  # teach the kept decoder the held-out colours; latents stay as they were
            vae, summary["vae_steps"], summary["vae_seconds"] = train_vae(data, device, args, history, vae)
        mean, std = encode_all(vae, data["images"], device)
        scale = float(vae.config.scaling_factor)
    else:
        clip, summary["clip_steps"], summary["clip_seconds"] = train_clip(data, device, args, history)
        vae, summary["vae_steps"], summary["vae_seconds"] = train_vae(data, device, args, history)
        mean, std = encode_all(vae, data["images"], device)
        scale = float(1.0 / (mean + std * torch.randn_like(mean)).std())
        vae.register_to_config(scaling_factor=scale)
    summary["scaling_factor"] = scale
    unet_extras = [(rate, *encode_all(vae, images, device), ids) for rate, images, ids in data["extras"]]
    unet, summary["unet_steps"], summary["unet_seconds"] = train_unet(
        data, clip.text_model, mean, std, scale, device, args, history, unet_extras
    )
    summary["total_seconds"] = time.time() - t0
    summary["config"] = {"text": TEXT, "vision": VISION, "unet": UNET, "vae": VAE, "args": vars(args)}
    print(json.dumps(summary), flush=True)
    save_all(Path(args.out), clip, vae, unet, history, summary)
    out = Path(args.out)
    sample_grid(unet, vae, clip.text_model, data["ids"][:8], data["empty_ids"], scale, out / "samples.png")
    held_out = data["held_out_ids"][:8]  # the held-out word: the subject should survive it
    sample_grid(unet, vae, clip.text_model, held_out, data["empty_ids"], scale, out / f"samples_{concept}.png")
    for name, (_, _, ids) in zip(extras, data["extras"]):
        sample_grid(unet, vae, clip.text_model, ids[:8], data["empty_ids"], scale, out / f"samples_{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
