"""What a wider tiny-SD UNet would cost `make demo`: one UNet call of the demo's sampling (batch 8 = 4 images x
classifier-free guidance, 16x16x4 latents, 77-token context), compiled, for the shipped width and wider ones.

    python benchmarks/bench_tiny_unet_width.py [--widths 32,64] [--calls 20] [--rounds 3]

Prints, per ``model_channels``, the parameter count, the fp16 file size and the median seconds per call, and the
ratio against the shipped width measured in the same run; the demo's two generation passes make 1,280 such calls.
Random weights: the cost does not depend on them. Writes ``benchmarks/results/bench_tiny_unet_width-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import ldm  # noqa: F401  (CPU defaults before mindspore)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = dict(  # ldm/configs/tiny_sd/tiny-sd.yaml's unet_config, model_channels aside
    in_channels=4,
    out_channels=4,
    attention_resolutions=[2, 1],
    num_res_blocks=1,
    channel_mult=[1, 2, 4],
    use_spatial_transformer=True,
    use_linear_in_transformer=False,
    transformer_depth=1,
    context_dim=64,
    num_heads=4,
)
DEMO_CALLS = 2 * 32 * 20  # before + after, 32 prompts, 20 DPM-Solver++ steps (4 images x 2 guidance rows per call)


def seconds_per_call(width: int, calls: int, rounds: int) -> tuple[int, float]:
    import mindspore as ms

    from ldm.models.unet import UNetModel

    net = UNetModel(model_channels=width, **SHIPPED)
    net.set_train(False)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((8, 4, 16, 16), np.float32))
    t = ms.Tensor(np.full(8, 500, np.int32))
    context = ms.Tensor(rng.standard_normal((8, 77, 64), np.float32))
    step = ms.jit(net.construct)
    step(x, t, context).asnumpy()  # compile
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step(x, t, context).asnumpy()
        times.append((time.perf_counter() - start) / calls)
    return sum(p.size for p in net.get_parameters()), statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="32,64", help="comma-separated model_channels; the first is the reference")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    widths = [int(w) for w in args.widths.split(",")]
    rows = []
    for width in widths:
        params, seconds = seconds_per_call(width, args.calls, args.rounds)
        rows.append(
            {"model_channels": width, "params": params, "fp16_mb": round(params * 2 / 1e6, 1), "s_per_call": seconds}
        )
    reference = rows[0]["s_per_call"]
    for row in rows:
        row["ratio"] = round(row["s_per_call"] / reference, 2)
        row["demo_unet_calls_s"] = round(row["s_per_call"] * DEMO_CALLS, 1)
        print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks/results" / f"bench_tiny_unet_width-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "demo_calls": DEMO_CALLS, "rows": rows}, indent=1) + "\n")
    print(" ".join(f"ratio_width{r['model_channels']}={r['ratio']}" for r in rows[1:]), f"(vs width {widths[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
