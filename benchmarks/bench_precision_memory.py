"""Resident weight memory of full-size SD2-base per precision policy, LoRA (rank 4, UNet attention) injected.

Each policy runs in its own child process which builds the model as the trainer does (config with the policy's
dtypes, LoRA injection, frozen weights stored in the compute dtype) and reports its resident memory after set-up
and its peak (the model is built and initialised in fp32 before the frozen weights are cast, so the peak shows the
fp32 build). Weights are random (none can be downloaded here); the size is what counts. Prints the ratio to the
first policy measured in the same run. Needs ~6 GiB for fp32; not part of CI. Run:

    python benchmarks/bench_precision_memory.py [--precisions fp32,fp16]
"""

import ldm  # noqa: F401, I001  (CPU defaults before mindspore)
import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(precision: str) -> None:
    from ldm.env import init_env
    from ldm.train.trainer import TrainOptions, build_trainable_model
    from ldm.util import load_config

    init_env("CPU", mode=1)
    opts = TrainOptions(precision=precision, lora_rank=4)
    model, params = build_trainable_model(opts, load_config(ROOT / "ldm/configs/v2-inference.yaml"))
    gc.collect()
    rss = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))
    stored = sum(p.size * (2 if "16" in str(p.dtype) else 4) for p in model.get_parameters())
    print(
        json.dumps(
            {
                "precision": precision,
                "trainable": sum(p.size for p in params),
                "weight_gib": stored / 2**30,
                "rss_gib": int(rss.split()[1]) / 2**20,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for precision in args.precisions.split(","):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", precision], cwd=ROOT, env=env, capture_output=True, text=True
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"{precision}: child failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        rows.append(json.loads(lines[-1]))
    print("| precision | trainable params | stored weights GiB | RSS after set-up GiB | peak RSS GiB | RSS vs first |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["rss_gib"] / rows[0]["rss_gib"]
        cells = f"{r['weight_gib']:.2f} | {r['rss_gib']:.2f} | {r['peak_rss_gib']:.2f} | {ratio:.2f}"
        print(f"| {r['precision']} | {r['trainable']:,} | {cells} |")


if __name__ == "__main__":
    main()
