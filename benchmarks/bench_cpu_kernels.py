"""What the CPU norm kernels (``ldm/models/cpu_kernels.cc``) change, measured in one process on the same weights.

Two sections, each building our side twice, once with ``LDM_CPU_KERNELS=0`` (MindSpore's GroupNorm/LayerNorm
kernels) and once with the kernels on, and timing the two alternately after one warm-up call each:

- ``train``: the ``bench_train.py`` LoRA step on the ``small`` UNet (batch 2), with torch + peft's step in the same
  rounds as the reference; the losses of both of our variants are printed (they agree to float rounding).
- ``sample``: ``bench_all.py``'s sample call (the shipped tiny SD, 20 DPM-Solver++ steps, guidance 7.5, decode) from
  the same initial latents; the largest pixel difference between the two variants' images is printed.

Last line: ``train_on_over_off=<median per-round ratio> train_on_over_torch=.. sample_on_over_off=..``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_train import load_average  # noqa: E402

from ldm.env import init_env  # noqa: E402
from ldm.models import cpu_kernels  # noqa: E402


def built_with(enabled: bool, build):
    """``build()`` with the kernels switched on or off for the cells it creates."""
    previous = os.environ.get(cpu_kernels.ENABLE_VAR)
    os.environ[cpu_kernels.ENABLE_VAR] = "1" if enabled else "0"
    try:
        return build()
    finally:
        if previous is None:
            del os.environ[cpu_kernels.ENABLE_VAR]
        else:
            os.environ[cpu_kernels.ENABLE_VAR] = previous


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rounds_of(fns: dict, rounds: int) -> dict:
    """Per-name lists of (seconds, output) over ``rounds`` rounds, the names alternating within each round."""
    for fn in fns.values():
        fn()  # warm-up: the graph compiles here
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def section_train(rounds: int) -> dict:
    from bench_train import build_train_pair

    torch_step, off, _ = built_with(False, lambda: build_train_pair("small", 2))
    _, on, _ = built_with(True, lambda: build_train_pair("small", 2))
    got = rounds_of({"torch": torch_step, "off": off, "on": on}, rounds)
    secs = {k: [t for t, _ in v] for k, v in got.items()}
    result = {k: statistics.median(v) for k, v in secs.items()}
    result["on_over_off"] = statistics.median(a / b for a, b in zip(secs["on"], secs["off"]))
    result["on_over_torch"] = statistics.median(a / b for a, b in zip(secs["on"], secs["torch"]))
    result["off_over_torch"] = statistics.median(a / b for a, b in zip(secs["off"], secs["torch"]))
    result["last_losses"] = {k: got[k][-1][1] for k in got}
    return result


def section_sample(rounds: int) -> dict:
    from bench_all import GUIDANCE, PROMPTS, SAMPLE_STEPS, _our_pipeline

    from ldm.pipeline import GenerationSettings

    prompt = PROMPTS.read_text(encoding="utf-8").splitlines()[0].strip()
    size, off = built_with(False, _our_pipeline)
    _, on = built_with(True, _our_pipeline)
    settings = GenerationSettings(steps=SAMPLE_STEPS, scale=GUIDANCE, height=size, width=size)
    latents = off.initial_latents(1, size, size, seed=0)
    calls = {name: (lambda p=p: p([prompt], [""], settings, latents=latents)) for name, p in (("off", off), ("on", on))}
    got = rounds_of(calls, rounds)
    secs = {k: [t for t, _ in v] for k, v in got.items()}
    result = {k: statistics.median(v) for k, v in secs.items()}
    result["on_over_off"] = statistics.median(a / b for a, b in zip(secs["on"], secs["off"]))
    images = [np.asarray(got[k][-1][1]).astype(np.int16) for k in ("off", "on")]
    result["image_max_abs_diff"] = int(np.abs(images[0] - images[1]).max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    parser.add_argument("--sections", default="train,sample")
    args = parser.parse_args()
    import torch

    init_env("CPU", mode=0, threads=args.threads)
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        raise SystemExit("the CPU kernels did not build on this machine (see the warning above)")
    print(
        f"{args.threads} threads, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
        f"load average {load_average()}"
    )
    summary = []
    sections = [s for s in args.sections.split(",") if s]
    if "train" in sections:
        r = section_train(args.rounds)
        print(
            f"train  torch {r['torch']:.3f} s  off {r['off']:.3f} s  on {r['on']:.3f} s  on/off {r['on_over_off']:.3f}"
            f"  on/torch {r['on_over_torch']:.3f}  off/torch {r['off_over_torch']:.3f}  last losses "
            + " ".join(f"{k} {v:.6f}" for k, v in r["last_losses"].items())
        )
        summary += [f"train_on_over_off={r['on_over_off']:.3f}", f"train_on_over_torch={r['on_over_torch']:.3f}"]
    if "sample" in sections:
        r = section_sample(args.rounds)
        print(
            f"sample off {r['off']:.3f} s  on {r['on']:.3f} s  on/off {r['on_over_off']:.3f}  "
            f"image max abs diff {r['image_max_abs_diff']}/255"
        )
        summary.append(f"sample_on_over_off={r['on_over_off']:.3f}")
    print(f"load average after: {load_average()}")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
