"""Pick the demo's LoRA recipe fast: train each candidate on the blueprint set in PyTorch (peft LoRA on the diffusers
UNet, the same optimiser, schedule, caption dropout and offset noise as our trainer) and sample the demo prompts.

    python tools/tiny_sd/lora_sweep.py --model DIR --out sweep/

``DIR`` holds ``unet/``, ``vae/``, ``clip/`` and ``tokenizer/`` (a diffusers export of the shipped model plus its
CLIP folder). Writes ``sweep.png`` (one row per recipe: the demo prompts' samples, first row the base model) and
``sweep.json`` (per recipe: the mean sample colour and the loss on the training images at fixed timesteps). The
recipe the demo uses is then trained for real by ``train_text_to_image.py`` (MindSpore); this is only a search.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
EXTENDED = ATTENTION + ["ff.net.0.proj", "ff.net.2"]
RECIPES = {  # name: (rank, targets, peak lr, steps, batch, noise offset)
    "r4_attn_lr2e-3_200x4": (4, ATTENTION, 2e-3, 200, 4, 0.0),
    "r4_attn_lr5e-3_200x4": (4, ATTENTION, 5e-3, 200, 4, 0.0),
    "r4_attn_lr2e-3_200x4_off0.1": (4, ATTENTION, 2e-3, 200, 4, 0.1),
    "r4_attn_lr5e-3_200x4_off0.1": (4, ATTENTION, 5e-3, 200, 4, 0.1),
    "r8_attn_lr5e-3_200x4_off0.1": (8, ATTENTION, 5e-3, 200, 4, 0.1),
    "r4_ext_lr5e-3_200x4_off0.1": (4, EXTENDED, 5e-3, 200, 4, 0.1),
    "r4_attn_lr1e-2_200x4_off0.1": (4, ATTENTION, 1e-2, 200, 4, 0.1),
    "r4_attn_lr5e-3_100x4_off0.1": (4, ATTENTION, 5e-3, 100, 4, 0.1),
    "r4_ext_lr5e-3_100x8_off0.1": (4, EXTENDED, 5e-3, 100, 8, 0.1),
    "r4_ext_lr1e-2_100x4_off0.1": (4, EXTENDED, 1e-2, 100, 4, 0.1),
}


def lr_at(step, total, peak, end=1e-4, warmup=10):
    """Linear warm-up, then cosine from ``peak`` to ``end`` (our trainer's ``scheduler: cosine``)."""
    if step < warmup:
        return peak * step / warmup
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def sample(unet, vae, ctx, empty, scale, seeds, steps=20, guidance=5.0):
    from diffusers import DPMSolverMultistepScheduler

    out = []
    for seed in seeds:
        sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        sched.set_timesteps(steps)
        z = torch.randn((ctx.shape[0], 4, 16, 16), generator=torch.Generator().manual_seed(seed)).to(ctx.device)
        both = torch.cat([empty.expand_as(ctx), ctx])
        for t in sched.timesteps:
            u, c = unet(torch.cat([z, z]), t, both).sample.chunk(2)
            z = sched.step(u + guidance * (c - u), t, z).prev_sample
        out.append(((vae.decode(z / scale).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1))
    return torch.cat(out).cpu().numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(ROOT / "models/tiny_sd/data"), help="blueprint_train/ and the prompts")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--only", action="append", help="run only these recipes (repeatable)")
    p.add_argument("--max_steps", type=int, help="cap every recipe's steps (a quick dry run)")
    args = p.parse_args()
    data_dir = Path(args.data)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPModel, CLIPTokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text = CLIPModel.from_pretrained(model / "clip", torch_dtype=torch.float32).text_model.to(dev).eval()
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32).to(dev).eval()
    scale = vae.config.scaling_factor

    def embed(captions):
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return text(ids.to(dev)).last_hidden_state

    train_dir = data_dir / "blueprint_train"
    rows = [json.loads(r) for r in (train_dir / "metadata.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(train_dir / r["file_name"]).convert("RGB")) for r in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    ctx_all, empty = embed([r["text"] for r in rows]), embed([""])
    prompts = [q for q in (data_dir / "blueprint_prompts.txt").read_text().splitlines() if q.strip()]
    ctx_prompts = embed(prompts)
    alphas = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.to(dev)
    fixed = torch.Generator(device=dev).manual_seed(0)
    fixed_t = torch.linspace(50, 900, 32, device=dev).long()
    fixed_noise = torch.randn((32, 4, 16, 16), device=dev, generator=fixed)

    def fixed_loss(unet):
        z = post.mean[:32] * scale
        a = alphas[fixed_t].view(-1, 1, 1, 1)
        with torch.no_grad():
            pred = unet(a.sqrt() * z + (1 - a).sqrt() * fixed_noise, fixed_t, ctx_all[:32]).sample
        return float(((pred - fixed_noise) ** 2).mean())

    seeds = [42, 43]
    grid_rows, report = [], {}
    base = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32).to(dev).eval()
    before = sample(base, vae, ctx_prompts, empty, scale, seeds)
    grid_rows.append(before)
    report["base"] = {"mean_rgb": before.reshape(-1, 3).mean(0).round(1).tolist(), "fixed_loss": fixed_loss(base)}
    report["blueprint_train_mean_rgb"] = images.reshape(-1, 3).mean(0).round(1).tolist()
    print(json.dumps(report), flush=True)
    for name, (rank, targets, lr, steps, batch, offset) in RECIPES.items():
        if args.only and name not in args.only:
            continue
        steps = min(steps, args.max_steps or steps)
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32).to(dev)
        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)
        params = [q for n, q in unet.named_parameters() if "lora_" in n]
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        t0, losses = time.time(), []
        unet.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr)
            idx = torch.randint(0, len(rows), (batch,), device=dev, generator=gen)
            z = (post.mean[idx] + post.std[idx] * torch.randn(post.mean[idx].shape, device=dev, generator=gen)) * scale
            ctx = torch.where((torch.rand(batch, device=dev, generator=gen) < 0.1).view(-1, 1, 1), empty, ctx_all[idx])
            t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
            noise = torch.randn(z.shape, device=dev, generator=gen)
            noise = noise + offset * torch.randn((*z.shape[:2], 1, 1), device=dev, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            loss = ((unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, ctx).sample - noise) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        unet.eval()
        after = sample(unet, vae, ctx_prompts, empty, scale, seeds)
        grid_rows.append(after)
        fifth = max(1, steps // 5)
        report[name] = {
            "mean_rgb": after.reshape(-1, 3).mean(0).round(1).tolist(),
            "fixed_loss": fixed_loss(unet),
            "loss_by_fifth": [round(float(np.mean(losses[i : i + fifth])), 4) for i in range(0, steps, fifth)],
            "seconds": round(time.time() - t0, 1),
        }
        print(name, json.dumps(report[name]), flush=True)
    strips = [np.concatenate(list(r), 1) for r in grid_rows]
    Image.fromarray(np.concatenate(strips, 0)).save(out / "sweep.png")
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
