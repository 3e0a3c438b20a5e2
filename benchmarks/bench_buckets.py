"""Graph-mode compile cost of aspect-ratio buckets: one compiled LoRA step per bucket shape, on the shipped tiny SD.

The trainer's ``TrainStep`` (rank-4 attention LoRA, AdamW, clipping) on the tiny SD's UNet (``ldm/configs/tiny_sd``,
random weights: compile time does not depend on them), batch 2, is called twice at each bucket shape of the recipe
``configs/train/train_config_lora_tiny_buckets.yaml`` (area 64x64, sides 32..128 in steps of 16), the 64x64 square
first. The first call at a shape compiles a new graph; ``compile_s`` = first call minus the second (a step at that
shape). The reference is the square's step time measured in the same run: ``compile/step`` says how many steps one
new shape costs. Each shape is then visited again to show that a shape seen before does not compile again. With
``--mode 1`` the same calls run in PyNative (no compile; slower steps). With ``--compile_cache DIR`` compiled graphs
are saved there and reloaded by a later run with the same options (run it twice: the second run's ``compile s`` is
the reload). Run:

    .venv/bin/python benchmarks/bench_buckets.py [--mode 0|1] [--shapes 4] [--threads 2] [--compile_cache DIR]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import statistics
import time

import mindspore as ms
import numpy as np

from bench_models import load_average
from ldm.data.buckets import BucketSpec
from ldm.env import init_env
from ldm.lora import UNET_ATTENTION_TARGETS, inject_lora
from ldm.models.diffusion import build_model_from_config
from ldm.train.losses import DiffusionLoss
from ldm.train.step import TrainStep
from ldm.util import CONFIG_DIR, load_config

SPEC = BucketSpec((64, 64), min_reso=32, max_reso=128, steps=16)  # the tiny buckets recipe's options
BATCH = 2


def timed(step, inputs) -> float:
    start = time.perf_counter()
    step(*inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", type=int, choices=(0, 1), default=0, help="0 graph (compiles), 1 PyNative")
    parser.add_argument("--shapes", type=int, default=4, help="bucket shapes to visit, the square first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile_cache", default=None, help="folder of MindSpore's compile cache (graph mode)")
    args = parser.parse_args()
    init_env("CPU", mode=args.mode, threads=args.threads, compile_cache_dir=args.compile_cache)
    config = load_config(CONFIG_DIR / "tiny_sd/tiny-sd.yaml")
    model = build_model_from_config(config)
    inject_lora(model.model, targets=UNET_ATTENTION_TARGETS, rank=4)
    params = [p for p in model.get_parameters() if p.requires_grad]
    loss_net = DiffusionLoss(model.model, model.alphas_cumprod, model.parameterization)
    step = TrainStep(loss_net, params, 1e-4, max_grad_norm=1.0, jit=args.mode == 0)
    square = (64, 64)
    buckets = [square] + sorted((b for b in SPEC.predefined() if b != square), key=lambda b: -b[0] * b[1])
    buckets = buckets[: args.shapes]
    rng = np.random.default_rng(0)
    context = ms.Tensor(rng.standard_normal((BATCH, 77, model.context_dim), dtype=np.float32))

    def inputs(bucket):
        w, h = (side // model.latent_factor for side in bucket)
        latents = [ms.Tensor(rng.standard_normal((BATCH, model.channels, h, w), dtype=np.float32)) for _ in "xe"]
        t = ms.Tensor(rng.integers(0, 1000, BATCH).astype(np.int32))
        return latents[0], context, t, latents[1], ms.Tensor(np.zeros((BATCH, model.channels, 1, 1), np.float32))

    mode = "graph" if args.mode == 0 else "PyNative"
    cache = f", compile cache {args.compile_cache}" if args.compile_cache else ""
    print(f"tiny SD LoRA step, batch {BATCH}, {mode} mode{cache}, {args.threads} threads, load {load_average()}")
    print(f"{'bucket':>8} {'latent':>7} {'first call s':>12} {'step s':>7} {'compile s':>9} {'again s':>7}")
    rows = []
    for bucket in buckets:
        batch = inputs(bucket)
        first, second = timed(step, batch), timed(step, batch)
        rows.append((bucket, batch, first, second))
    reference = rows[0][3]
    for bucket, batch, first, second in rows:
        again = timed(step, batch)
        w, h = bucket
        latent = f"{w // model.latent_factor}x{h // model.latent_factor}"
        print(f"{w:>4}x{h:<3} {latent:>7} {first:12.2f} {second:7.3f} {first - second:9.2f} {again:7.3f}")
    compiles = [first - second for _, _, first, second in rows]
    new_shape = statistics.median(compiles[1:] or [0.0])
    print(f"load average after: {load_average()}")
    print(
        f"first_shape_compile_s={compiles[0]:.1f} new_shape_compile_s={new_shape:.1f} square_step_s={reference:.3f} "
        f"new_shape_compile_in_steps={new_shape / reference:.0f}"
    )


if __name__ == "__main__":
    main()
