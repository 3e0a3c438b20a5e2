"""Forward-pass time of each network, ours (MindSpore graph and PyNative) against diffusers/transformers (torch eager).

Builds an SD2-shaped diffusers pipeline with random weights, converts it through ``read_diffusers_folder`` /
``load_pretrained`` (so both sides hold the same weights), then times UNet (batch 2), VAE encode, VAE decode and the
text encoder on identical inputs. Graph mode is timed after a first (compiling) call, whose time is reported apart.
Both frameworks get the same number of CPU threads. The last column is max|ours - ref| / max|ref| of the outputs, a
sanity check that the two sides compute the same function. Run:

    .venv/bin/python benchmarks/bench_models.py [--size tiny|small] [--repeats 5] [--threads 2]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import torch
from mindspore import nn

from ldm.env import init_env
from ldm.io.diffusers_format import read_diffusers_folder
from ldm.io.model_io import load_pretrained
from ldm.models.diffusion import build_model_from_config

# Reference shapes. "tiny" is tests/tiny_diffusers.py; "small" is SD2-shaped (linear projections, 32 channels per
# head, gelu OpenCLIP-style text encoder, 4-level VAE with 8x downsampling) but narrow enough for a 2-core CPU.
SIZES = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
        ),
        latent=16,
        vae=dict(block_out_channels=(32, 64), layers_per_block=1),
        image=32,
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    ),
    "small": dict(
        unet=dict(
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4, 8),
        ),
        latent=32,
        vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2),
        image=128,
        text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4),
    ),
}
UNET_BATCH = 2
TEXT_LENGTH = 77


def build_reference(size: str, seed: int = 0):
    """(unet, vae, text encoder) as diffusers/transformers modules with random weights, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SIZES[size]
    width = spec["text"]["hidden_size"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=spec["latent"],
        cross_attention_dim=width,
        use_linear_projection=True,
        norm_num_groups=32,
        **spec["unet"],
    )
    levels = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        sample_size=spec["image"],
        **spec["vae"],
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            intermediate_size=4 * width,
            vocab_size=49408,
            max_position_embeddings=TEXT_LENGTH,
            hidden_act="gelu",
            **spec["text"],
        )
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, vae, text):
            # default init keeps activations at a sane scale; perturbed norms/biases make a mapping error visible
            for p in module.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            module.eval()
    return unet, vae, text


def convert(unet, vae, text):
    """(our ``LatentDiffusion`` holding the reference weights, its config), through a diffusers folder as users
    convert."""
    from diffusers import DDIMScheduler

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        unet.save_pretrained(folder / "unet")
        vae.save_pretrained(folder / "vae")
        text.save_pretrained(folder / "text_encoder")
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
            folder / "scheduler"
        )
        _, config = read_diffusers_folder(folder)
        model = build_model_from_config(config)
        load_pretrained(model, folder)
    model.set_train(False)
    return model, config


class _Unet(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.unet = model.model

    def construct(self, x, t, context):
        return self.unet(x, t, context)


class _Encode(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.vae = model.first_stage_model

    def construct(self, x):
        return self.vae.encode(x)[0]


class _Decode(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.vae = model.first_stage_model

    def construct(self, z):
        return self.vae.decode(z)


class _Text(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.text = model.cond_stage_model

    def construct(self, ids):
        return self.text(ids)


def make_cases(size: str, model, ref, rng):
    """(name, our Cell, its inputs, torch callable, its inputs) for each timed network."""
    unet, vae, text = ref
    spec = SIZES[size]
    width, latent, image = spec["text"]["hidden_size"], spec["latent"], spec["image"]
    x = rng.standard_normal((UNET_BATCH, 4, latent, latent), dtype=np.float32)
    t = np.array([999, 321][:UNET_BATCH], dtype=np.int32)
    ctx = rng.standard_normal((UNET_BATCH, TEXT_LENGTH, width), dtype=np.float32)
    img = rng.uniform(-1, 1, (1, 3, image, image)).astype(np.float32)
    z = rng.standard_normal((1, 4, image // 8, image // 8), dtype=np.float32)
    ids = rng.integers(0, 49407, (1, TEXT_LENGTH)).astype(np.int32)
    ids[0, -1] = 49407  # an end-of-text token to pool on
    tt = torch.from_numpy
    return [
        (
            f"UNet b{UNET_BATCH} {latent}x{latent}",
            _Unet(model),
            (x, t, ctx),
            lambda: unet(tt(x), tt(t.astype(np.int64)), encoder_hidden_states=tt(ctx)).sample,
        ),
        (f"VAE encode {image}px", _Encode(model), (img,), lambda: vae.encode(tt(img)).latent_dist.mean),
        (f"VAE decode {image // 8}->{image}px", _Decode(model), (z,), lambda: vae.decode(tt(z)).sample),
        (
            f"text enc {TEXT_LENGTH}x{width}",
            _Text(model),
            (ids,),
            lambda: text(tt(ids.astype(np.int64))).last_hidden_state,
        ),
    ]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def _clock(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(cell, inputs, torch_fn, repeats: int) -> dict:
    """Interleaved rounds of torch / graph / PyNative calls, so the three see the same machine load.

    Returns median seconds of each, the median of the per-round ratios, the graph compile time (first graph call
    minus a steady one) and the outputs of the last round.
    """
    args = [ms.Tensor(a) for a in inputs]

    def ours(mode):
        ms.set_context(mode=mode)
        return cell(*args).asnumpy()

    with torch.no_grad():
        torch_call = lambda: torch_fn().numpy()  # noqa: E731
        for _ in range(2):
            torch_call()
        first, _ = _clock(lambda: ours(ms.GRAPH_MODE))
        ours(ms.GRAPH_MODE)
        ours(ms.PYNATIVE_MODE)
        rows = []
        for _ in range(repeats):
            t_torch, ref = _clock(torch_call)
            t_graph, graph = _clock(lambda: ours(ms.GRAPH_MODE))
            t_pyn, pyn = _clock(lambda: ours(ms.PYNATIVE_MODE))
            rows.append((t_torch, t_graph, t_pyn))
    med = [statistics.median(col) for col in zip(*rows)]
    return {
        "torch": med[0],
        "graph": med[1],
        "pynative": med[2],
        "compile": first - med[1],
        "graph_ratio": statistics.median(g / t for t, g, _ in rows),
        "pynative_ratio": statistics.median(p / t for t, _, p in rows),
        "err": max(rel_err(graph, ref), rel_err(pyn, ref)),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    args = parser.parse_args()
    init_env("CPU", mode=0, threads=args.threads)
    torch.set_num_threads(args.threads)

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    ref = build_reference(args.size)
    model, _ = convert(*ref)
    cases = make_cases(args.size, model, ref, np.random.default_rng(0))
    print(
        f"size={args.size}, {args.repeats} interleaved rounds (median), {args.threads} threads, "
        f"torch {torch.__version__}, mindspore {ms.__version__}, "
        f"ONEDNN_MAX_CPU_ISA={isa}, load average {load_average()}"
    )
    header = (
        f"{'network':<24} {'torch ms':>9} {'graph ms':>9} {'compile s':>9} {'pynative ms':>11} "
        f"{'graph/torch':>11} {'pyn/torch':>9} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, cell, inputs, torch_fn in cases:
        r = measure(cell, inputs, torch_fn, args.repeats)
        print(
            f"{name:<24} {1e3 * r['torch']:9.1f} {1e3 * r['graph']:9.1f} {r['compile']:9.1f} "
            f"{1e3 * r['pynative']:11.1f} {r['graph_ratio']:11.2f} {r['pynative_ratio']:9.2f} {r['err']:8.1e}"
        )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
