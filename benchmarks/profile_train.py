"""Where the LoRA training step spends its time: per-operator totals of our compiled step and of torch + peft.

Builds the same pair as ``bench_train`` (same UNet, adapter and batch), runs one step of each to warm up (ours
compiles), then profiles ``--steps`` steps: ours with MindSpore's profiler (CPU kernel timestamps), torch with
``torch.profiler``. Prints, per side, the operator types by total self time per step, forward and backward apart for
ours (kernels under a ``Gradients`` scope are the backward pass). Run:

    .venv/bin/python benchmarks/profile_train.py [--size small] [--steps 3] [--threads 2] [--top 20]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import collections
import glob
import os
import re
import tempfile
import time

import torch

from bench_train import build_train_pair
from bench_models import SIZES, load_average
from ldm.env import init_env


def kernel_type(full_name: str) -> str:
    """``Default/.../Gradients/.../Conv2DBackpropInput-op123`` -> ``Conv2DBackpropInput`` (the profiler's own type
    column says ``HostCpuOps`` for every CPU kernel)."""
    return re.sub(r"(-op\d+)+$", "", full_name.rsplit("/", 1)[-1])


def mindspore_op_times(folder: str) -> dict[tuple[str, str], tuple[float, int]]:
    """{(op type, 'fwd'|'bwd'): (total ms, calls)} from the CPU kernel timestamp file the profiler wrote."""
    files = glob.glob(os.path.join(folder, "**", "cpu_op_execute_timestamp_*.txt"), recursive=True)
    if not files:
        raise RuntimeError(f"the MindSpore profiler wrote no CPU kernel timestamps under {folder}")
    totals = collections.defaultdict(lambda: [0.0, 0])
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.strip().split(";")
                if len(fields) < 3:
                    continue
                name, times = fields[0], fields[-1]
                op_type = kernel_type(name)
                phase = "bwd" if "Gradients" in name else "fwd"
                for record in times.split():
                    _, dur_ms, _ = record.split(",")
                    totals[(op_type, phase)][0] += float(dur_ms)
                    totals[(op_type, phase)][1] += 1
    return {k: (v[0], v[1]) for k, v in totals.items()}


def profile_ours(step, steps: int) -> tuple[dict, float]:
    from mindspore.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(tmp)) as prof:
            for _ in range(steps):
                step()
                prof.step()
        wall = (time.perf_counter() - start) / steps
        return mindspore_op_times(tmp), wall


def profile_torch(step, steps: int) -> tuple[dict, float]:
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps
    return {(e.key, ""): (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}, wall


def report(title: str, times: dict, steps: int, wall: float, top: int) -> None:
    total = sum(ms_ for ms_, _ in times.values())
    calls = sum(n for _, n in times.values())
    print(
        f"\n{title}: {1e3 * wall:.0f} ms/step wall, {total / steps:.0f} ms/step in kernels, "
        f"{calls / steps:.0f} kernels/step"
    )
    print(f"{'op type':<40} {'phase':>5} {'ms/step':>9} {'share':>6} {'calls/step':>10}")
    for (op, phase), (ms_, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{op[:40]:<40} {phase:>5} {ms_ / steps:9.1f} {ms_ / total:6.1%} {calls / steps:10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps after one warm-up step each")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=20, help="operator types listed per side")
    args = parser.parse_args()
    init_env("CPU", mode=0, threads=args.threads)
    torch.set_num_threads(args.threads)
    torch_step, ours, described = build_train_pair(args.size, args.batch)
    print(f"{described}, {args.threads} threads, load average {load_average()}")
    torch_step()
    ours()
    ours_times, ours_wall = profile_ours(ours, args.steps)
    torch_times, torch_wall = profile_torch(torch_step, args.steps)
    report("ours (MindSpore graph, CPU kernels)", ours_times, args.steps, ours_wall, args.top)
    report("torch + peft (self CPU time per ATen op)", torch_times, args.steps, torch_wall, args.top)
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
