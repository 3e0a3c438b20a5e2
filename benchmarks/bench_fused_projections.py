"""Fused LoRA attention projections against separate layers: one LoRA training step, both variants in one process.

Two copies of the same UNet (``bench_models``'s reference, converted into ours) get the same rank-4 LoRA on
``to_q/to_k/to_v/to_out.0``; one of them computes each attention's q/k/v (self-attention) and k/v (cross-attention)
as one projection (``fuse_lora_projections``, ``ldm.models.attention.plan_attention_fusion``). Both run the
compiled ``TrainStep`` on the same fixed batch, alternating (separate, fused, separate, ...) so both see the same
machine load; the losses must agree (the same products summed in another order). Prints the median of the per-pair
time ratios and ends with ``fused_over_separate=<ratio>``. Run:

    .venv/bin/python benchmarks/bench_fused_projections.py [--size tiny|small] [--steps 8] [--batch 2] [--threads 2]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import statistics
import time

import mindspore as ms
import numpy as np

from bench_models import SIZES, TEXT_LENGTH, build_reference, convert, load_average
from ldm.env import init_env
from ldm.lora import UNET_ATTENTION_TARGETS, inject_lora, lora_layers
from ldm.models.attention import plan_attention_fusion
from ldm.train.losses import DiffusionLoss
from ldm.train.step import TrainStep

RANK = 4


def build_step(unet, vae, text, fused: bool, batch_arrays, lora_values=None):
    """Our compiled LoRA train step on a fresh conversion of the reference; returns (step, LoRA values, fused count)."""
    model, _ = convert(unet, vae, text)
    inject_lora(model.model, targets=UNET_ATTENTION_TARGETS, rank=RANK)
    layers = [p for _, layer in lora_layers(model.model) for p in layer.lora_parameters()]
    if lora_values is None:
        lora_values = [p.asnumpy() for p in layers]
    for p, value in zip(layers, lora_values):
        p.set_data(ms.Tensor(value))
    fused_count = plan_attention_fusion(model.model, enable=fused)
    params = [q for q in model.get_parameters() if q.requires_grad]
    loss = DiffusionLoss(model.model, model.alphas_cumprod, model.parameterization)
    step = TrainStep(loss, params, 1e-4, weight_decay=1e-2, max_grad_norm=1.0)
    inputs = [ms.Tensor(a) for a in batch_arrays]
    return (lambda: float(step(*inputs).loss)), lora_values, fused_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=8, help="timed pairs after the first (compiling) step of each")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    init_env("CPU", mode=0, threads=args.threads)
    spec = SIZES[args.size]
    rng = np.random.default_rng(0)
    b, n = args.batch, spec["latent"]
    arrays = (
        rng.standard_normal((b, 4, n, n), dtype=np.float32),
        rng.standard_normal((b, TEXT_LENGTH, spec["text"]["hidden_size"]), dtype=np.float32),
        rng.integers(0, 1000, b).astype(np.int32),
        rng.standard_normal((b, 4, n, n), dtype=np.float32),
        np.zeros((b, 4, 1, 1), np.float32),
    )
    reference = build_reference(args.size)
    separate, values, _ = build_step(*reference, fused=False, batch_arrays=arrays)
    fused, _, count = build_step(*reference, fused=True, batch_arrays=arrays, lora_values=values)
    print(f"size={args.size}, batch {b}, {args.threads} threads, {count} fused projections, load {load_average()}")
    for name, step in (("separate", separate), ("fused", fused)):
        start = time.perf_counter()
        step()
        print(f"{name}: first (compiling) step {time.perf_counter() - start:.1f} s")
    rows, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        a = separate()
        mid = time.perf_counter()
        f = fused()
        rows.append((mid - start, time.perf_counter() - mid))
        losses.append((a, f))
    drift = max(abs(f - a) / abs(a) for a, f in losses)
    print(
        f"median step s: separate {statistics.median(r[0] for r in rows):.3f}, fused "
        f"{statistics.median(r[1] for r in rows):.3f}; max relative loss difference {drift:.1e}"
    )
    print(f"load average after: {load_average()}")
    print(f"fused_over_separate={statistics.median(f / s for s, f in rows):.3f}")


if __name__ == "__main__":
    main()
