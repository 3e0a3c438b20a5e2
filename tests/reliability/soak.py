"""`make soak`: a long tiny LoRA training run (default 2,000 steps, a checkpoint every 100) watched for leaks.

The training CLI runs as a child process; its resident memory (``VmRSS`` from ``/proc``, Linux) is sampled every
half second and every step's time comes from ``metrics.jsonl``. The run passes when

* it exits 0 and wrote every checkpoint (all complete and finite: read back with the library's strict reader),
* RSS after the first checkpoint grows by less than ``--rss_growth_mib`` until the end (no per-step or
  per-checkpoint leak),
* the median step time of the last 100 steps is within ``--slowdown`` times that of steps 101-200.

It prints the figures either way. Timings on a shared machine are noisy; the RSS bound is the stricter check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"


def rss_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_path", default="output/soak")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--interval", type=int, default=100, help="checkpoint every this many steps")
    parser.add_argument("--rss_growth_mib", type=float, default=64.0)
    parser.add_argument("--slowdown", type=float, default=1.5)
    args = parser.parse_args()

    import ldm  # noqa: F401  (before mindspore)
    from ldm.data.synthetic import make_shapes_dataset
    from ldm.env import set_seed
    from ldm.io.checkpoint import read_state_dict
    from ldm.io.model_io import save_model
    from ldm.models.diffusion import build_model_from_config
    from ldm.util import CONFIG_DIR, load_config

    out = Path(args.output_path)
    run_dir = out / "run"
    if run_dir.exists():
        print(f"error: {run_dir} exists; remove it or pass another --output_path", file=sys.stderr)
        return 2
    data = make_shapes_dataset(out / "data", count=16, size=32)
    base = out / "base.safetensors"
    if not base.exists():
        set_seed(0)
        config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
        save_model(build_model_from_config(config), base, config=config)

    cmd = [sys.executable, str(SCRIPT), "--train_config", str(TINY), "--data_path", str(data)]
    cmd += ["--output_path", str(run_dir), "--pretrained_model_path", str(base), "--train_batch_size", "2"]
    cmd += ["--max_train_steps", str(args.steps), "--ckpt_save_interval", str(args.interval)]
    cmd += ["--scheduler", "constant", "--warmup_steps", "0", "--log_interval", "100"]
    start = time.perf_counter()
    with open(out / "train.log", "w", encoding="utf-8") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        samples: list[tuple[float, int, float]] = []  # (seconds, steps logged so far, RSS MiB)
        metrics = run_dir / "metrics.jsonl"
        while child.poll() is None:
            rss = rss_mib(child.pid)
            if rss is not None:
                steps = sum(1 for _ in open(metrics, encoding="utf-8")) if metrics.is_file() else 0
                samples.append((time.perf_counter() - start, steps, rss))
            time.sleep(0.5)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        print(f"error: training exited with {child.returncode}; see {out / 'train.log'}", file=sys.stderr)
        return 1

    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    times = [r["step_time_s"] for r in records]
    adapters = sorted((run_dir / "ckpt").glob("lora-*.safetensors"))
    for path in [*adapters, run_dir / "ckpt" / "train_state.safetensors"]:
        read_state_dict(path)  # complete and finite, or this raises naming the file
    after_first_ckpt = [rss for _, steps, rss in samples if steps > args.interval]
    growth = max(after_first_ckpt) - after_first_ckpt[0] if after_first_ckpt else float("nan")
    early = statistics.median(times[args.interval : 2 * args.interval])
    late = statistics.median(times[-args.interval :])
    expected = args.steps // args.interval

    print(f"soak: {len(records)} steps in {wall:.0f} s, {len(adapters)} adapters (expected {expected}) + train state")
    print(f"  RSS: peak {max(r for _, _, r in samples):.0f} MiB; after step {args.interval}: "
          f"{after_first_ckpt[0]:.0f} -> {after_first_ckpt[-1]:.0f} MiB (max growth {growth:.1f} MiB, "
          f"bound {args.rss_growth_mib:.0f})")  # fmt: skip
    print(f"  step time (median): steps {args.interval + 1}-{2 * args.interval}: {early * 1000:.1f} ms, last "
          f"{args.interval}: {late * 1000:.1f} ms (ratio {late / early:.2f}, bound {args.slowdown}); "
          f"p95 overall {sorted(times)[int(0.95 * len(times))] * 1000:.1f} ms")  # fmt: skip
    ok = len(records) == args.steps and len(adapters) == expected
    ok = ok and growth < args.rss_growth_mib and late <= args.slowdown * early
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
