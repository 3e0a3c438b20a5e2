"""LoRA training through the CLI with and without ``cache_latents`` + ``cache_text_embeddings``, at bench size.

Builds the ``small`` networks of ``bench_models`` (random weights, converted through a diffusers folder as users
do), writes a shapes data set at 256 px (latents 32x32, the UNet shape ``bench_train`` times) and runs
``train_text_to_image.py`` alternately without and with the cache (``--rounds`` pairs, same seed, flips on). Each run
reports its median step time (steps after the first), its first step, the caching time and the resident memory of
the training process, sampled every 0.2 s: peak, and median while steps run (after the encoders were released).
The last line is ``ratio_step=<cached/uncached median step> rss_training_mib=<uncached>/<cached>``. Run:

    .venv/bin/python benchmarks/bench_cache.py [--steps 8] [--rounds 1] [--images 16] [--threads 2]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import build_reference, convert, load_average
from ldm.data.synthetic import make_shapes_dataset
from ldm.io.model_io import save_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
IMAGE_SIZE = 256
CACHE = ("--cache_latents", "True", "--cache_text_embeddings", "True")

# Runs the CLI unchanged in this process with a fixed CPU thread count (the CLI leaves MindSpore's default).
DRIVER = """
import runpy, sys
import ldm.env
init_env = ldm.env.init_env
ldm.env.init_env = lambda *a, **k: init_env(*a, **k, threads={threads})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def rss_mib(pid: int) -> float | None:
    """Current resident memory of a process (Linux ``/proc``), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def train(base: Path, data: Path, out: Path, args, extra: tuple) -> dict:
    """One CLI run; its step times, caching time and RSS samples (peak, median while training)."""
    cmd = [sys.executable, "-c", DRIVER.format(threads=args.threads), str(SCRIPT)]
    cmd += ["--pretrained_model_path", str(base), "--data_path", str(data), "--output_path", str(out)]
    cmd += ["--image_size", str(IMAGE_SIZE), "--train_batch_size", str(args.batch), "--random_flip", "True"]
    cmd += ["--max_train_steps", str(args.steps), "--lora_rank", "4", "--use_ema", "False", "--seed", "1", *extra]
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    setup, training = [], []
    while proc.poll() is None:
        value = rss_mib(proc.pid)
        if value is not None:
            (training if metrics.is_file() else setup).append(value)
        time.sleep(0.2)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed:\n{stderr[-3000:]}")
    steps = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()]
    cached = re.search(r"cached .* in ([0-9.]+) s; the cache holds ([0-9.]+) MiB", stderr)
    return {
        "first_s": steps[0],
        "median_s": statistics.median(steps[1:]),
        "cache_s": float(cached.group(1)) if cached else 0.0,
        "cache_mib": float(cached.group(2)) if cached else 0.0,
        "peak_mib": max(setup + training),
        "training_mib": statistics.median(training) if training else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (the first one compiles)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (uncached, cached), alternating")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, config = convert(*build_reference("small"))
        base = tmp / "base.safetensors"
        save_model(model, base, config=config)
        del model
        data = make_shapes_dataset(tmp / "data", count=args.images, size=IMAGE_SIZE)
        print(
            f"size=small, {args.images} images at {IMAGE_SIZE} px, batch {args.batch}, {args.steps} steps per run, "
            f"{args.threads} threads, flips on; load average {load_average()}"
        )
        runs = {"uncached": [], "cached": []}
        for round_ in range(args.rounds):
            for name, extra in (("uncached", ()), ("cached", CACHE)):
                runs[name].append(train(base, data, tmp / f"{name}-{round_}", args, extra))
    print(
        f"{'':<10} {'first step s':>12} {'median step s':>13} {'caching s':>9} {'cache MiB':>9} "
        f"{'peak RSS MiB':>12} {'RSS training MiB':>16}"
    )
    summary = {}
    for name, results in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        s = summary[name]
        print(
            f"{name:<10} {s['first_s']:12.1f} {s['median_s']:13.3f} {s['cache_s']:9.1f} {s['cache_mib']:9.1f} "
            f"{s['peak_mib']:12.0f} {s['training_mib']:16.0f}"
        )
    ratio = summary["cached"]["median_s"] / summary["uncached"]["median_s"]
    print(f"load average after: {load_average()}")
    print(
        f"ratio_step={ratio:.2f} rss_training_mib={summary['uncached']['training_mib']:.0f}/"
        f"{summary['cached']['training_mib']:.0f}"
    )


if __name__ == "__main__":
    main()
