"""Which oneDNN kernels MindSpore's convolutions and matmuls get under each ``ONEDNN_MAX_CPU_ISA``, and how fast.

``import ldm`` caps oneDNN at AVX2 because MindSpore's convolutions are many times slower above it. This probe shows
why and what the cap costs: for each ISA it starts a fresh process (oneDNN reads the variable once), runs a 3x3
convolution forward, its input gradient and a Dense-sized matmul in MindSpore's graph mode with ``ONEDNN_VERBOSE=1``,
and reports the implementation oneDNN chose and its mean execution time per call (from oneDNN's own log, so
MindSpore's dispatch is not counted). torch runs the same three ops in another process as the reference (its
matmul is MKL's, not oneDNN's). Run alone on the machine:

    .venv/bin/python benchmarks/probe_isa.py [--isas AVX2,AVX512_CORE] [--repeats 5] [--threads 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONV = (2, 128, 64, 64)  # batch, channels, height, width of the 3x3 convolution's input
MATMUL = (8192, 320, 320)  # rows x inner x outputs: SD's first attention width on 2 x 64x64 latents


def mindspore_child(repeats: int, threads: int) -> None:
    """Run each op ``repeats`` times after one warm-up call; oneDNN's verbose log on stdout does the timing."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn, ops

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(threads)
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(CONV[1], CONV[1], 3, pad_mode="pad", padding=1, has_bias=False)
    image = Tensor(rng.standard_normal(CONV, dtype=np.float32))
    rows, inner, outputs = MATMUL
    x = Tensor(rng.standard_normal((rows, inner), dtype=np.float32))
    w = Tensor(rng.standard_normal((inner, outputs), dtype=np.float32))

    @ms.jit
    def conv_forward(image):
        return conv(image)

    def conv_sum(image):
        return conv(image).sum()

    input_grad = ms.jit(ms.grad(conv_sum, grad_position=0))

    @ms.jit
    def matmul(x, w):
        return ops.matmul(x, w)

    for name, call in [
        ("conv", lambda: conv_forward(image)),
        ("conv_grad", lambda: input_grad(image)),
        ("matmul", lambda: matmul(x, w)),
    ]:
        call().asnumpy()
        print(f"probe: {name} start", flush=True)
        for _ in range(repeats):
            call().asnumpy()
        print(f"probe: {name} end", flush=True)


def torch_child(repeats: int, threads: int) -> None:
    """The same ops in torch; prints {op: median ms} as JSON."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(CONV[1], CONV[1], 3, padding=1, bias=False).requires_grad_(False)
    image = torch.randn(CONV, generator=gen)
    rows, inner, outputs = MATMUL
    x, w = torch.randn(rows, inner, generator=gen), torch.randn(inner, outputs, generator=gen)

    def conv_grad():
        leaf = image.clone().requires_grad_(True)
        conv(leaf).sum().backward()
        return leaf.grad

    times = {}
    for name, call in [("conv", lambda: conv(image)), ("conv_grad", conv_grad), ("matmul", lambda: x @ w)]:
        call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append(1000 * (time.perf_counter() - start))
        times[name] = statistics.median(samples)
    print(json.dumps(times))


def onednn_exec_records(log: str):
    """(primitive, direction, implementation, exec ms) of each primitive execution in a oneDNN verbose log
    (``onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,<direction>,...,<ms>``)."""
    for line in log.splitlines():
        if line.startswith("onednn_verbose,") and ",primitive,exec," in line:
            fields = line.split(",")
            yield fields[5], fields[7] or "-", fields[6], float(fields[-1])


def parse_verbose(log: str, repeats: int) -> dict[str, dict]:
    """{op: {"impl": oneDNN implementation(s), "ms": exec ms per call}} from the child's verbose log; a call's time
    is the sum of the oneDNN primitives it ran (the gradient call runs the forward convolution and the backward)."""
    result, op, calls = {}, None, []
    for line in log.splitlines():
        if line.startswith("probe: ") and line.endswith(" start"):
            op, calls = line.split()[1], []
        elif line.startswith("probe: ") and line.endswith(" end"):
            impls = sorted({impl for impl, _ in calls})
            result[op] = {"impl": " + ".join(impls), "ms": sum(ms for _, ms in calls) / repeats}
            op = None
        elif op:
            calls += [
                (f"{primitive}:{impl}", ms)
                for primitive, _, impl, ms in onednn_exec_records(line)
                if primitive in ("convolution", "matmul", "inner_product")
            ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isas", default="AVX2,AVX512_CORE", help="comma-separated ONEDNN_MAX_CPU_ISA values")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["mindspore", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "mindspore":
        return mindspore_child(args.repeats, args.threads)
    if args.child == "torch":
        return torch_child(args.repeats, args.threads)

    common = [sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads), "--child"]
    torch_env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    run = subprocess.run([*common, "torch"], capture_output=True, text=True, env=torch_env, check=True)
    reference = json.loads(run.stdout.strip().splitlines()[-1])
    print(
        f"conv: 3x3, {CONV[1]} -> {CONV[1]} channels, input {CONV}; matmul {MATMUL[0]}x{MATMUL[1]} @ "
        f"{MATMUL[1]}x{MATMUL[2]}; {args.threads} threads; {args.repeats} calls each (torch: median wall time, "
        "MindSpore: mean of oneDNN's exec times)"
    )
    print(f"torch {' '.join(f'{op} {ms:.1f} ms' for op, ms in reference.items())} (its own ISA, MKL matmul)")
    print(f"{'ONEDNN_MAX_CPU_ISA':<20} {'op':<10} {'oneDNN ms':>10} {'/ torch':>8}  implementation")
    for isa in args.isas.split(","):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "ONEDNN_VERBOSE": "1"}
        run = subprocess.run([*common, "mindspore"], capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise SystemExit(f"error: the MindSpore child failed under {isa}:\n{run.stderr[-2000:]}")
        for op, row in parse_verbose(run.stdout, args.repeats).items():
            print(f"{isa:<20} {op:<10} {row['ms']:>10.1f} {row['ms'] / reference[op]:>8.2f}  {row['impl']}")


if __name__ == "__main__":
    main()
