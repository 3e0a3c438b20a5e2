"""Where the first training step's compile time goes: MindSpore's per-phase compile log of our LoRA ``TrainStep``.

Runs the ``bench_train`` step (same UNet, adapter, batch) in a child process with MindSpore's INFO log on
(``GLOG_v=1``), keeps only the timing lines (frontend ``Pass <name> start/end``, backend ``[PROF]<phase> costs``),
and prints the time per phase summed over every graph compiled during the first step, next to the first-step and
steady-step times, so the table accounts for the first-step overhead. Run:

    .venv/bin/python benchmarks/compile_phases.py [--size small] [--threads 2] [--top 25]
"""

import argparse
import collections
import datetime
import os
import re
import subprocess
import sys
import time

FRONTEND = re.compile(r"^\[INFO\] \w+\(\d+,\w+,\w+\):(\S+) .*\] Pass (\w+) (start|end)")
BACKEND = re.compile(r"\[PROF\](\w+) costs ([0-9.]+) msec")
RESULT = re.compile(r"^(FIRST|STEADY) ([0-9.]+)$")


def _stamp(text: str) -> float:
    """Seconds of a glog timestamp ``2026-12-02-07:39:40.088.242``."""
    day, clock = text[:10], text[11:]
    h, m, rest = clock.split(":")
    s, milli, micro = rest.split(".")
    base = datetime.datetime.strptime(day, "%Y-%m-%d").timestamp()
    return base + int(h) * 3600 + int(m) * 60 + int(s) + int(milli) / 1e3 + int(micro) / 1e6


def child(size: str, threads: int) -> None:
    """Build the step, time its first and a later call (printed as ``FIRST s`` / ``STEADY s``)."""
    from bench_train import build_train_pair  # imports ldm before mindspore

    from ldm.env import init_env

    init_env("CPU", mode=0, threads=threads)
    _, ours, _ = build_train_pair(size, 2)
    for label in ("FIRST", "STEADY"):
        start = time.perf_counter()
        ours()
        print(f"{label} {time.perf_counter() - start:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "small"), default="small")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=25, help="phases listed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.size, args.threads)
        return
    env = dict(os.environ, GLOG_v="1", GLOG_logtostderr="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--child", "--size", args.size, "--threads", str(args.threads)]
    frontend = collections.defaultdict(float)
    backend = collections.defaultdict(float)
    open_passes: dict[str, float] = {}
    results, tail = {}, collections.deque(maxlen=20)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            if m := FRONTEND.match(line):
                stamp, name, edge = _stamp(m.group(1)), m.group(2), m.group(3)
                if edge == "start":
                    open_passes[name] = stamp
                elif name in open_passes:
                    frontend[name] += stamp - open_passes.pop(name)
            elif m := BACKEND.search(line):
                backend[m.group(1)] += float(m.group(2)) / 1e3
            elif m := RESULT.match(line.strip()):
                results[m.group(1)] = float(m.group(2))
            elif not line.startswith(("[INFO]", "[WARNING]")):
                tail.append(line.rstrip())
    if proc.returncode or len(results) != 2:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"error: the timed child failed (exit status {proc.returncode}), its last lines above")
    overhead = results["FIRST"] - results["STEADY"]
    print(
        f"{args.size} LoRA TrainStep, {args.threads} threads: first step {results['FIRST']:.1f} s, "
        f"later step {results['STEADY']:.2f} s, first-step overhead {overhead:.1f} s, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    # Frontend passes nest (e.g. 'add_attr' holds 'add_attr_with_inline'); the table lists each as logged.
    rows = [("frontend", k, v) for k, v in frontend.items()] + [("backend", k, v) for k, v in backend.items()]
    print(f"{'stage':<9} {'phase':<44} {'seconds':>8} {'of overhead':>11}")
    for stage, name, seconds in sorted(rows, key=lambda r: -r[2])[: args.top]:
        print(f"{stage:<9} {name:<44} {seconds:8.2f} {seconds / overhead:11.1%}")


if __name__ == "__main__":
    main()
