"""Per-step overhead of each sampler, apart from the network: wall time per step with a trivial jit-compiled model.

The model is one elementwise op, so the number is what the sampler itself adds to every UNet call (coefficient
math, the latent update ops, the timestep tensor, the guidance concat/split). Run:

    .venv/bin/python benchmarks/bench_samplers.py [--steps 20] [--size 64] [--batch 1] [--mode 0]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import time

import mindspore as ms
import numpy as np
from mindspore import ops

from ldm.env import init_env
from ldm.samplers import SAMPLERS, get_sampler, guided_model_fn


@ms.jit
def toy_model(x, t, ctx):
    """Stands in for the UNet: same signature, negligible cost."""
    return ops.tanh(x + t.astype(x.dtype).reshape((-1, 1, 1, 1)) * 1e-3 + ctx.mean(axis=(1, 2)).reshape((-1, 1, 1, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="latent height/width (64 for 512px images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", type=int, default=0, help="0 = GRAPH_MODE, 1 = PYNATIVE_MODE")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    init_env("CPU", mode=args.mode)

    rng = np.random.default_rng(0)
    x_T = ms.Tensor(rng.standard_normal((args.batch, 4, args.size, args.size)).astype(np.float32))
    ctx = tuple(ms.Tensor(rng.standard_normal((args.batch, 77, 1024)).astype(np.float32)) for _ in range(2))
    model = guided_model_fn(toy_model, 7.5)
    print(f"latents {tuple(x_T.shape)}, guided (batch {2 * args.batch} model calls), {args.steps} steps")
    for name in SAMPLERS:
        sampler = get_sampler(name)
        sampler.sample(model, x_T, ctx, 2).asnumpy()  # compile
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            sampler.sample(model, x_T, ctx, args.steps).asnumpy()
            best = min(best, time.perf_counter() - start)
        print(f"{name:>14}: {1e3 * best / args.steps:7.2f} ms/step (best of {args.repeats})")


if __name__ == "__main__":
    main()
