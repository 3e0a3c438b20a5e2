"""What each LoRA variant costs on the shipped tiny SD: trainable parameters and training-step time against plain
LoRA, measured in one run.

Every variant is built as the trainer builds it (``build_trainable_model`` on ``models/tiny_sd``, rank 4 on the
``extended`` targets, the demo recipe's), then timed as one compiled ``TrainStep`` (graph mode, AdamW, clipping) on a
fixed batch of latents and contexts (the cached-training step: no VAE, no text encoder). Rounds are interleaved
(lora, locon, dora, ..., lora, ...) so every variant sees the same machine load; the printed time is the median step,
the ratio the median over rounds of (variant / lora) in that round. Run:

    .venv/bin/python benchmarks/bench_lora_variants.py [--steps 4] [--rounds 3] [--batch 4] [--threads 2]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import os
import statistics
import time
from pathlib import Path

import mindspore as ms
import numpy as np

from ldm.env import init_env
from ldm.io.model_config import resolve_model_config
from ldm.train.losses import DiffusionLoss
from ldm.train.options import TrainOptions
from ldm.train.step import TrainStep
from ldm.train.trainer import build_trainable_model

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models/tiny_sd/tiny_sd.safetensors"
COMMON = {"lora_rank": 4, "lora_targets": "extended"}
VARIANTS = {
    "lora": {},
    "locon (conv_rank 4)": {"conv_rank": 4, "conv_alpha": 1.0},
    "dora": {"lora_type": "dora"},
    "locon + dora": {"conv_rank": 4, "conv_alpha": 1.0, "lora_type": "dora"},
}


def build_step(options: dict, batch: int):
    """(step closure, trainable parameter count, adapted module count) of one variant."""
    opts = TrainOptions(pretrained_model_path=str(WEIGHTS), **COMMON, **options)
    config = resolve_model_config(checkpoint=WEIGHTS).config
    model, params = build_trainable_model(opts, config)
    n = config["model"]["params"]["image_size"]
    ctx_dim = config["model"]["params"]["unet_config"]["params"]["context_dim"]
    rng = np.random.default_rng(0)
    arrays = (
        rng.standard_normal((batch, 4, n, n), dtype=np.float32),
        rng.standard_normal((batch, 77, ctx_dim), dtype=np.float32),
        rng.integers(0, 1000, batch).astype(np.int32),
        rng.standard_normal((batch, 4, n, n), dtype=np.float32),
        np.zeros((batch, 4, 1, 1), np.float32),
    )
    loss = DiffusionLoss(model.model, model.alphas_cumprod, model.parameterization)
    step = TrainStep(loss, params, 1e-4, weight_decay=1e-2, max_grad_norm=1.0)
    inputs = [ms.Tensor(a) for a in arrays]
    modules = sum(p.name.endswith(".lora_down.weight") for p in params)
    return (lambda: step(*inputs).loss), sum(p.size for p in params), modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    init_env("CPU", mode=0, threads=args.threads)
    built = {}
    for name, options in VARIANTS.items():
        step, n_params, n_modules = build_step(options, args.batch)
        start = time.perf_counter()
        step()  # compiles
        built[name] = (step, n_params, n_modules, time.perf_counter() - start)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (step, *_rest) in built.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(
        f"tiny SD ({WEIGHTS.name}), rank 4 on extended targets, batch {args.batch}, {args.threads} threads, "
        f"ONEDNN_MAX_CPU_ISA={isa}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    ref_params, ref_times = built["lora"][1], times["lora"]
    print(f"{'variant':<22} {'modules':>7} {'params':>8} {'x lora':>7} {'first s':>8} {'step s':>7} {'x lora':>7}")
    for name, (_, n_params, n_modules, first) in built.items():
        ratio = statistics.median(t / r for t, r in zip(times[name], ref_times))
        print(
            f"{name:<22} {n_modules:7d} {n_params:8d} {n_params / ref_params:7.2f} {first:8.1f} "
            f"{statistics.median(times[name]):7.3f} {ratio:7.2f}"
        )


if __name__ == "__main__":
    main()
