"""Where the time of one tiny-SD text-to-image call goes (the ``sample`` section of ``bench_all.py``, ours only):
text encode, the sampler's model calls (UNet with guidance), the sampler's own per-step work, the VAE decode.

Each piece is timed alone after a warm-up call of the whole pipeline (which compiles it); the sampler's own work is
its loop's time minus its model calls (each timed to its result being ready). Medians over ``--repeats``.
``--kernels`` then profiles one guided UNet call per side over ``--repeats`` calls, per operator type: ours with
MindSpore's profiler (as ``profile_train.py``), diffusers' UNet (from the folder ``python -m ldm.convert`` writes
from the same file) with ``torch.profiler``. Run:

    .venv/bin/python benchmarks/profile_sample.py [--threads 1] [--repeats 5] [--steps 20] [--kernels]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np

from bench_all import GUIDANCE, PROMPTS, SAMPLE_STEPS, TINY_SD, _our_pipeline
from bench_models import load_average
from ldm.env import init_env
from ldm.pipeline import GenerationSettings


def timed_model_calls(sampler, seconds: list):
    """Wrap ``sampler._call`` so that each model call's time, to its result being on the host, lands in
    ``seconds``."""
    call = sampler._call

    def timed(*args):
        start = time.perf_counter()
        out = call(*args)
        if isinstance(out, ms.Tensor):
            out.asnumpy()
        seconds.append(time.perf_counter() - start)
        return out

    sampler._call = timed


def profile_unet_calls(pipe, size: int, calls: int, top: int) -> None:
    """Per-operator time of one guided UNet call (batch 2 with guidance), ours and diffusers'."""
    import torch
    from diffusers import UNet2DConditionModel
    from profile_train import profile_ours, profile_torch, report

    f = pipe.model.latent_factor
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, pipe.model.channels, size // f, size // f), dtype=np.float32)
    context = pipe.encode_prompts([""])
    context = ms.ops.cat((context, context), axis=0)
    t, scale = ms.Tensor(np.array([999], np.int32)), ms.Tensor(GUIDANCE, ms.float32)
    ours = lambda: pipe.guided_denoise(ms.Tensor(x), t, context, scale).asnumpy()  # noqa: E731
    ours()
    times, wall = profile_ours(ours, calls)
    report("ours: guided UNet call (MindSpore graph, CPU kernels)", times, calls, wall, top)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny_sd_diffusers"
        subprocess.run([sys.executable, "-m", "ldm.convert", str(TINY_SD), str(folder)], check=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    xt, ct = torch.from_numpy(np.concatenate([x, x])), torch.from_numpy(context.asnumpy())
    tt = torch.tensor([999, 999])

    def theirs():
        with torch.no_grad():
            out_u, out_c = unet(xt, tt, ct).sample.chunk(2)
            return out_u + GUIDANCE * (out_c - out_u)

    theirs()
    times, wall = profile_torch(theirs, calls)
    report("diffusers: UNet call + guidance (torch, self CPU time per ATen op)", times, calls, wall, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--kernels", action="store_true", help="also profile one UNet call per side by operator")
    parser.add_argument("--top", type=int, default=15, help="operator types listed per side with --kernels")
    args = parser.parse_args()
    init_env("CPU", mode=0, threads=args.threads)
    if args.kernels:
        import torch

        torch.set_num_threads(args.threads)
    prompt = PROMPTS.read_text(encoding="utf-8").splitlines()[0].strip()
    size, pipe = _our_pipeline()
    settings = GenerationSettings(steps=args.steps, scale=GUIDANCE, height=size, width=size)
    latents = pipe.initial_latents(1, size, size, seed=0)
    print(f"tiny SD {size}x{size}, {args.steps} steps, {args.threads} threads, load average {load_average()}")
    start = time.perf_counter()
    pipe([prompt], [""], settings, latents=latents)
    print(f"first call (compiles): {time.perf_counter() - start:.2f} s")
    model_calls: list[float] = []
    timed_model_calls(pipe.sampler, model_calls)
    rows = {"whole call": [], "text encode (2 prompts)": [], "sampler loop": [], "model calls": [], "VAE decode": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        pipe([prompt], [""], settings, latents=latents)
        rows["whole call"].append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.encode_prompts([prompt]).asnumpy(), pipe.encode_prompts([""]).asnumpy()
        rows["text encode (2 prompts)"].append(time.perf_counter() - start)
        model_calls.clear()
        start = time.perf_counter()
        x0 = pipe.sample_latents([prompt], [""], latents, settings)
        x0.asnumpy()
        rows["sampler loop"].append(time.perf_counter() - start)
        rows["model calls"].append(sum(model_calls))
        start = time.perf_counter()
        pipe.decode(x0)
        rows["VAE decode"].append(time.perf_counter() - start)
    for name, values in rows.items():
        print(f"{name:<24} {statistics.median(values):.4f} s")
    own = statistics.median(loop - calls for loop, calls in zip(rows["sampler loop"], rows["model calls"]))
    print(f"{'sampler own work':<24} {own:.4f} s ({1e3 * own / args.steps:.2f} ms/step)")
    print(f"load average after: {load_average()}")
    if args.kernels:
        profile_unet_calls(pipe, size, args.repeats, args.top)


if __name__ == "__main__":
    main()
