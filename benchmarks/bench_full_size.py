"""Full-size SD2-base at 512px: our CLIs against diffusers (+ peft), peak memory and time, each job its own process.

Jobs (each runs in a fresh child process whose peak RSS is read from ``wait4``):

- ``train``: LoRA rank 4 on the UNet attention (``to_q/to_k/to_v/to_out.0``), batch ``--batch``, ``--steps`` steps,
  VAE encode + text encode of every batch included, no EMA. Ours runs ``train_text_to_image.py`` with
  ``configs/train/train_config_lora_v2.yaml`` as a user does (with ``--use_recompute`` False and True, and
  ``--cache`` on/off for the recipe's cached latents and text embeddings); diffusers
  runs the loop of its ``train_text_to_image_lora.py`` (frozen VAE/text encoder under ``no_grad``, peft LoRA,
  AdamW, clipping at 1.0).
- ``generate``: one 512x512 image, DPM-Solver++ ``--gen_steps`` steps, guidance 9 (UNet batch 2), VAE decode. Ours
  runs ``text_to_image.py``; diffusers runs the same loop as its ``StableDiffusionPipeline`` (prompt embeddings,
  ``DPMSolverMultistepScheduler``, CFG, ``vae.decode``).
- ``convert`` (ours only): ``python -m ldm.convert`` of the diffusers folder into a single file, as a user converts
  downloaded weights; the written file must hold the same arrays as the one ``prepare`` made.
- ``load`` (ours only): build the model and ``load_pretrained`` the weights, then encode two prompts and release the
  text encoder as ``text_to_image.py`` does, twice: built with uninitialised parameters (what the CLIs do) and built
  with random values first (what they did before); RSS after the build, the load and the release, peak of each.

Our jobs load the weights the way ``--load`` says: ``file`` (our converted ``.safetensors``, the default) or
``folder`` (the diffusers folder itself, converted while loading).

Both sides use the same random weights: the diffusers models are built from the SD2-base configuration (no weights
can be downloaded here), saved as a diffusers folder and converted with ``python -m ldm.convert`` as a user would.
Reported: peak RSS, first-step time, mean time of the later steps, ours/diffusers ratios from the same run, and
the machine's 1-minute load average at the start and end of each job (times on a shared machine depend on it).
``--frameworks ours --random_init`` measures our side alone with randomly initialised models (no torch, no weight
files; memory does not depend on the weights' values, the load path aside).
Slow (minutes per job) and memory-hungry (up to ~8 GiB per job); not part of CI. Run:

    python benchmarks/bench_full_size.py --work /tmp/fullsize [--jobs train,generate,convert,load] [--load file]
        [--steps 3] [--gen_steps 20] [--recompute off,on] [--cache on,off]
"""

import ldm  # noqa: F401, I001  (CPU defaults before mindspore)
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a watercolor painting of a red fox"
RANK = 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LENGTH = 77


def build_diffusers_sd2(seed: int = 0):
    """SD2-base UNet, VAE and OpenCLIP-H text encoder (23 layers, as diffusers' SD2 ``text_encoder``), random."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
            vocab_size=49408,
            max_position_embeddings=TEXT_LENGTH,
        )
    )
    return unet.eval(), vae.eval(), text.eval()


def prepare(work: Path) -> dict:
    """Diffusers folder, our converted single file and a 4-image 512px data set (each made once)."""
    from diffusers import DDIMScheduler

    folder, weights, data = work / "sd2-base-diffusers", work / "sd2-base.safetensors", work / "data512"
    if not (folder / "unet").is_dir():
        unet, vae, text = build_diffusers_sd2()
        unet.save_pretrained(folder / "unet")
        vae.save_pretrained(folder / "vae")
        text.save_pretrained(folder / "text_encoder")
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
            folder / "scheduler"
        )
        del unet, vae, text
    convert = None
    if not weights.is_file():
        convert = run_child([sys.executable, "-m", "ldm.convert", str(folder), str(weights)], "convert")
    if not (data / "img_txt.csv").is_file():
        from ldm.data.synthetic import make_shapes_dataset

        make_shapes_dataset(data, count=4, size=512)
    return {"folder": folder, "weights": weights, "data": data, "convert": convert}


def run_child(cmd: list[str], label: str, must_succeed: bool = True) -> dict:
    """Run ``cmd`` from the repo root; return its wall time, peak RSS (GiB), exit code, stdout and the load average
    before and after. A failure is fatal unless ``must_succeed`` is False (a training run killed for memory is a
    result: its peak is reported)."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / 2**20
    if proc.returncode and must_succeed:
        raise SystemExit(f"error: {label} failed (exit {proc.returncode}):\n{out[-3000:]}")
    if proc.returncode:
        label += f" [exit {proc.returncode}]"
    wall = time.perf_counter() - start
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
    return {"label": label, "wall_s": wall, "peak_rss_gib": peak, "stdout": out, "load": load}


def child_json(result: dict) -> dict:
    """The last JSON line a child printed (its own timings)."""
    lines = [line for line in result["stdout"].splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _flag(name: str, value) -> list[str]:
    """``--name value``, or nothing for ``plan`` (the memory plan chooses) or None."""
    return [] if value in ("plan", None) else [f"--{name}", str(value)]


def with_estimate(result: dict) -> dict:
    """``result`` with the memory plan's estimate (from the child's ``memory plan:`` log line, the last one) and
    its error against the measured peak."""
    lines = [line for line in result["stdout"].splitlines() if "memory plan:" in line]
    if lines:
        estimate = float(lines[-1].split("est. peak ")[1].split(" GiB")[0])
        result.update(plan=lines[-1].split("memory plan: ")[1].split(" - est.")[0], est_gib=estimate)
        result["est_error"] = estimate / result["peak_rss_gib"] - 1
    return result


def ours_train(paths: dict, work: Path, args, recompute: str, cache: bool) -> dict:
    out = work / f"ours-train-{args.precision}-b{args.batch}-rc{recompute}-cache{int(cache)}"
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    cmd = [
        sys.executable,
        "examples/stable_diffusion_v2/train_text_to_image.py",
        "--train_config",
        "configs/train/train_config_lora_v2.yaml",
        "--data_path",
        str(paths["data"]),
        "--output_path",
        str(out),
        *(["--pretrained_model_path", str(paths["load"])] if paths["load"] else []),
        "--train_batch_size",
        str(args.batch),
        "--max_train_steps",
        str(args.steps),
        "--use_ema",
        "False",
        *_flag("use_recompute", recompute),
        *_flag("memory_efficient_attention", args.memory_efficient_attention),
        *_flag("max_memory_gib", args.max_memory_gib),
        "--precision",
        args.precision,
        "--cache_latents",
        str(cache),
        "--cache_text_embeddings",
        str(cache),
    ]
    caching = "cached latents + text embeddings" if cache else "uncached"
    label = f"ours train {args.precision} (recompute: {recompute}, {caching}){_source(paths)}"
    result = with_estimate(run_child(cmd, label, must_succeed=False))
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    times = [s["step_time_s"] for s in steps]
    if times:
        result.update(first_s=times[0], steady_s=_mean(times[1:]))
    return result


def ours_generate(paths: dict, work: Path, args) -> dict:
    cmd = [
        sys.executable,
        "examples/stable_diffusion_v2/text_to_image.py",
        "--version",
        "2.0",
        *(["--ckpt_path", str(paths["load"])] if paths["load"] else []),
        "--prompt",
        PROMPT,
        "--sampling_steps",
        str(args.gen_steps),
        "--n_iter",
        "1",
        "--H",
        "512",
        "--W",
        "512",
        *_flag("mode", args.mode),
        *_flag("attention_slice_size", args.attention_slice_size),
        *_flag("max_memory_gib", args.max_memory_gib),
        "--output_path",
        str(work / "ours-generate"),
    ]
    result = with_estimate(run_child(cmd, f"ours generate{_source(paths)}"))
    line = [x for x in result["stdout"].splitlines() if " images in " in x]
    result["sample_s"] = float(line[-1].split(" images in ")[1].split("s")[0]) if line else float("nan")
    return result


def ours_tiny(work: Path, args) -> list[dict]:
    """The shipped tiny SD (models/tiny_sd) with default memory settings: a LoRA run of ``--steps`` steps at batch
    ``--batch`` on 64px shapes, and one image of ``--gen_steps`` steps."""
    from ldm.data.synthetic import make_shapes_dataset

    data, weights, config = work / "data64", "models/tiny_sd/tiny_sd.safetensors", "ldm/configs/tiny_sd/tiny-sd.yaml"
    if not (data / "img_txt.csv").is_file():
        make_shapes_dataset(data, count=8, size=64)
    train = [sys.executable, "examples/stable_diffusion_v2/train_text_to_image.py", "--model_config", config]
    train += ["--pretrained_model_path", weights, "--data_path", str(data), "--output_path", str(work / "tiny-train")]
    train += ["--image_size", "64", "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps)]
    train += ["--use_lora", "True", "--use_ema", "False", *_flag("max_memory_gib", args.max_memory_gib)]
    generate = [sys.executable, "examples/stable_diffusion_v2/text_to_image.py", "--config", config, "--ckpt_path"]
    generate += [weights, "--prompt", "a red circle", "--n_iter", "1", "--sampling_steps", str(args.gen_steps)]
    generate += ["--output_path", str(work / "tiny-generate"), *_flag("max_memory_gib", args.max_memory_gib)]
    return [
        with_estimate(run_child(train, "ours tiny SD train")),
        with_estimate(run_child(generate, "ours tiny SD image")),
    ]


def ours_convert(paths: dict, work: Path) -> dict:
    """Convert the diffusers folder again into a scratch file, whose tensors must equal the prepared file's."""
    out = work / "ours-convert.safetensors"
    cmd = [sys.executable, "-m", "ldm.convert", str(paths["folder"]), str(out), "--overwrite"]
    result = run_child(cmd, "ours convert (diffusers folder -> file)")
    for got, want in zip(_raw_tensors(out), _raw_tensors(paths["weights"]), strict=True):
        if got != want:
            raise SystemExit(f"error: {out}: tensor {got[0]!r} differs from {paths['weights']}")
    out.unlink()
    return result


def ours_load(paths: dict, work: Path) -> list[dict]:
    rows = []
    for build in ("uninitialised", "random"):
        cmd = [sys.executable, __file__, "--child", "load", "--work", str(work), "--build", build]
        result = run_child(
            cmd + ["--load", paths["load_kind"]], f"ours build ({build}) + load the {paths['load_kind']}"
        )
        rows.append({**result, **child_json(result)})
    return rows


def load_child(args) -> None:
    """Build SD2-base and load the weights in this (child) process; print RSS after each phase as one JSON line."""
    import gc

    import mindspore as ms

    from ldm.env import init_env
    from ldm.io.model_config import resolve_model_config
    from ldm.io.model_io import load_pretrained
    from ldm.models.diffusion import build_model_from_config

    def rss_gib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20

    work = Path(args.work)
    source = work / ("sd2-base.safetensors" if args.load == "file" else "sd2-base-diffusers")
    init_env("CPU", mode=1)
    start = time.perf_counter()
    model = build_model_from_config(resolve_model_config(checkpoint=source).config, args.build == "uninitialised")
    built = rss_gib()
    load_pretrained(model, source)
    loaded, load_s = rss_gib(), time.perf_counter() - start
    model.get_learned_conditioning(ms.Tensor(model.tokenize([PROMPT, ""]))).asnumpy()
    model.cond_stage_model = None
    gc.collect()
    print(json.dumps({"built_gib": built, "loaded_gib": loaded, "released_gib": rss_gib(), "load_s": load_s}))


def _raw_tensors(path: Path):
    """(name, dtype, shape, bytes) of each tensor of a safetensors file in name order, one at a time (this process
    stays small)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for key in sorted(header):
            begin, end = header[key]["data_offsets"]
            f.seek(8 + size + begin)
            yield key, header[key]["dtype"], header[key]["shape"], f.read(end - begin)


def _source(paths: dict) -> str:
    return f", loading the {paths['load_kind']}" if paths.get("load") else ", random init"


SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def peft_lora_step(unet):
    """The UNet step of diffusers' ``train_text_to_image_lora.py`` on a frozen ``unet``: peft LoRA (rank ``RANK`` on
    ``TARGETS``), eps MSE on noised latents, clipping at 1.0, AdamW. Returns ``step(latents, context, generator)``."""
    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    noise_sched = DDPMScheduler(**SCHEDULE)

    def step(latents, context, gen):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, context).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    return step


def diffusers_child(job: str, args) -> None:
    """Run one diffusers job in this (child) process and print its timings as one JSON line."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.tokenizer import CLIPTokenizer

    torch.set_num_threads(args.threads)
    folder = Path(args.work) / "sd2-base-diffusers"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    tokenizer = CLIPTokenizer.for_family("sd2")
    ids = torch.from_numpy(np.asarray(tokenizer([PROMPT] * args.batch), dtype=np.int64))
    times = []
    if job == "train":
        for m in (vae, text):
            m.requires_grad_(False)
        step = peft_lora_step(unet)
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            start = time.perf_counter()
            images = torch.rand((args.batch, 3, 512, 512), generator=gen) * 2 - 1
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample(generator=gen) * 0.18215
                context = text(ids)[0]
            step(latents, context, gen)
            times.append(time.perf_counter() - start)
        print(json.dumps({"first_s": times[0], "steady_s": _mean(times[1:])}))
        return
    sampler = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++")
    sampler.set_timesteps(args.gen_steps)
    start = time.perf_counter()
    with torch.no_grad():
        cond = text(ids[:1])[0]
        uncond = text(torch.from_numpy(np.asarray(tokenizer([""]), dtype=np.int64)))[0]
        context = torch.cat([uncond, cond])
        x = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(0))
        for t in sampler.timesteps:
            step_start = time.perf_counter()
            eps_u, eps_c = unet(torch.cat([x, x]), t, context).sample.chunk(2)
            x = sampler.step(eps_u + 9.0 * (eps_c - eps_u), t, x).prev_sample
            times.append(time.perf_counter() - step_start)
        vae.decode(x / 0.18215).sample.numpy()
    print(json.dumps({"sample_s": time.perf_counter() - start, "first_s": times[0], "steady_s": _mean(times[1:])}))


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the weights, data and outputs (~11 GB)")
    parser.add_argument(
        "--jobs",
        default="train,generate",
        help="any of train, generate, convert, load, tiny (the last three ours only)",
    )
    parser.add_argument(
        "--load", choices=("file", "folder"), default="file", help="ours: load the converted file or the folder"
    )
    parser.add_argument("--frameworks", default="ours,diffusers")
    parser.add_argument(
        "--recompute", default="plan", help="our training runs: plan (the memory plan chooses), off, on, or a list"
    )
    parser.add_argument(
        "--cache", default="on", help="our training runs: cached latents and text embeddings on, off or on,off"
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (the first includes set-up)")
    parser.add_argument("--gen_steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attention_slice_size", default="plan", help="ours: text_to_image.py's option (plan: unset)")
    parser.add_argument("--mode", default="plan", help="ours: text_to_image.py's --mode (plan: unset)")
    parser.add_argument("--max_memory_gib", default=None, help="ours: the CLIs' --max_memory_gib (default: unset)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--precision", default="fp32", help="ours: --precision of the training runs (fp32, fp16)")
    parser.add_argument(
        "--memory_efficient_attention", default="plan", help="ours: the training runs' option (plan: unset)"
    )
    parser.add_argument(
        "--random_init", action="store_true", help="ours only: randomly initialised models, no weight files or torch"
    )
    parser.add_argument("--child", choices=["train", "generate", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--build", choices=["uninitialised", "random"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "load":
        load_child(args)
        return
    if args.child:
        diffusers_child(args.child, args)
        return
    for option, values in (("recompute", {"plan", "on", "off"}), ("cache", {"on", "off"})):
        if not set(getattr(args, option).split(",")) <= values:
            raise SystemExit(
                f"error: --{option} takes a list of {', '.join(sorted(values))}, got {getattr(args, option)!r}"
            )
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    jobs, frameworks = args.jobs.split(","), args.frameworks.split(",")
    if args.random_init:
        if "diffusers" in frameworks:
            raise SystemExit("error: --random_init measures our side only; pass --frameworks ours")
        paths = {"load": None, "data": work / "data512"}
        if not (paths["data"] / "img_txt.csv").is_file():
            from ldm.data.synthetic import make_shapes_dataset

            make_shapes_dataset(paths["data"], count=4, size=512)
    else:
        paths = prepare(work)
        paths.update(load=paths["weights"] if args.load == "file" else paths["folder"], load_kind=args.load)
        if paths["convert"]:
            print(f"convert: {paths['convert']['wall_s']:.0f}s, peak RSS {paths['convert']['peak_rss_gib']:.2f} GiB")
    rows = []
    for job in jobs:
        ref = None
        if job == "tiny":
            rows.extend(ours_tiny(work, args))
            continue
        if job in ("convert", "load"):
            if args.random_init:
                raise SystemExit(f"error: the {job} job needs the weight files; drop --random_init")
            rows.extend([ours_convert(paths, work)] if job == "convert" else ours_load(paths, work))
            continue
        saved = work / f"diffusers-{job}-b{args.batch}-s{args.steps if job == 'train' else args.gen_steps}.json"
        if "diffusers" in frameworks:
            cmd = [sys.executable, __file__, "--child", job, "--work", str(work)]
            cmd += ["--steps", str(args.steps), "--gen_steps", str(args.gen_steps), "--batch", str(args.batch)]
            ref = run_child(cmd + ["--threads", str(args.threads)], f"diffusers {job}")
            ref.update(child_json(ref))
            rows.append(ref)
            saved.write_text(json.dumps({k: v for k, v in ref.items() if k != "stdout"}))
        elif saved.is_file():  # the reference measured by an earlier run in this work folder
            ref = {**json.loads(saved.read_text()), "stdout": ""}
            ref["label"] += " (earlier run)"
            rows.append(ref)
        if "ours" in frameworks:
            runs = (
                [
                    ours_train(paths, work, args, {"on": "True", "off": "False"}.get(rc, rc), cache == "on")
                    for rc in args.recompute.split(",")
                    for cache in args.cache.split(",")
                ]
                if job == "train"
                else [ours_generate(paths, work, args)]
            )
            for run in runs:
                key = "steady_s" if job == "train" else "sample_s"
                if ref and key in run:
                    run["time_ratio"] = run[key] / ref[key]
                if ref:
                    run["rss_ratio"] = run["peak_rss_gib"] / ref["peak_rss_gib"]
                rows.append(run)
    weights = "random init" if args.random_init else "converted random weights"
    print(f"\nSD2-base 512px, batch {args.batch}, {args.steps} train steps, {args.gen_steps} sampling steps, {weights}")
    columns = "peak RSS GiB | wall s | first step s | later steps s | generation s | ours/diffusers time | RSS | load"
    print(f"| job | {columns} | memory plan | plan's estimate GiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "built_gib" in r:
            phases = (("built", "built_gib"), ("loaded", "loaded_gib"), ("text encoder released", "released_gib"))
            r["label"] += " (RSS " + ", ".join(f"{name} {r[key]:.2f}" for name, key in phases) + " GiB)"
        cells = [r.get(k, float("nan")) for k in ("first_s", "steady_s", "sample_s", "time_ratio", "rss_ratio")]
        row = f"| {r['label']} | {r['peak_rss_gib']:.2f} | {r['wall_s']:.0f} | " + " | ".join(f"{c:.2f}" for c in cells)
        estimate = f"{r['est_gib']:.2f} | {r['est_error']:+.0%}" if "est_gib" in r else " | "
        print(row + f" | {r['load']} | {r.get('plan', '')} | {estimate} |")


if __name__ == "__main__":
    main()
