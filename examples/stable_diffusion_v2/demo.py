"""`make demo`: LoRA teaches the shipped tiny SD a style it never saw, measured with FID, KID and CLIP score.

Steps, each one the CLI a user would run: (1) ``text_to_image.py`` renders the held-out concept's prompts
(``CONCEPT``, "blueprint") with the base model (DPM-Solver++, 20 steps); (2) ``train_text_to_image.py --train_config
configs/train/train_config_lora_tiny_sd_blueprint.yaml`` LoRA fine-tunes it on the concept's 200 training images
(validation grids on the way); (3) ``text_to_image.py --use_lora True`` renders the prompts again; (4)
``eval_fid.py --kid`` against the Inception features of the concept's 612 held-out test images and
``eval_clip_score.py`` with the tiny CLIP score both sets. The fine-tune holds out ``VALIDATION_SPLIT`` of the images
for the validation loss (printed per step, drawn in ``loss.png``) and keeps an adapter every ``CKPT_EVERY`` steps;
(5) ``python -m ldm.lora select`` scores those adapters at ``SELECT_SCALES`` on a few held-out prompts (KID, CLIP score)
and their prior drift on the base model's own clip-art prompts, and names the adapter and scale it would ship.
Prints a table, the grid paths and, last, one line ``FID before=.. after=.. KID before=.. after=.. CLIP before=..
after=..``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ldm.atomic import save_image, write_text

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models/tiny_sd"
CONCEPT = "blueprint"  # the held-out concept (tools/tiny_sd/make_data.py): its data is models/tiny_sd/data/<it>_*
TRAIN_CONFIG = ROOT / f"configs/train/train_config_lora_tiny_sd_{CONCEPT}.yaml"
SAMPLES_PER_PROMPT = 4
GUIDANCE = 5.0
VALIDATION_SPLIT, VALIDATION_EVERY, CKPT_EVERY = 0.1, 25, 50
SELECT_SCALES, SELECT_PROMPTS, SELECT_SAMPLES = ("0.5", "1.0"), 4, 2  # small N: 16 images per candidate
BASE_STYLE = "a clip art drawing of"  # the base model's own captions: the prior the adapter should leave alone


def run(step: str, args: list[str]) -> None:
    """Run one CLI as a subprocess; stop the demo with its exit status if it fails."""
    print(f"\n== {step}: {' '.join(args)}", flush=True)
    start = time.monotonic()
    rc = subprocess.call([sys.executable, *args], cwd=ROOT)
    print(f"== {step}: {time.monotonic() - start:.0f} s", flush=True)
    if rc:
        print(f"error: {step} failed (exit status {rc})", file=sys.stderr)
        sys.exit(rc)


def generate(out: Path, prompts: Path, lora: Path | None) -> None:
    args = ["examples/stable_diffusion_v2/text_to_image.py", "--ckpt_path", str(MODEL / "tiny_sd.safetensors")]
    args += ["--data_path", str(prompts), "--n_samples", str(SAMPLES_PER_PROMPT), "--n_iter", "1"]
    args += ["--H", "64", "--W", "64", "--sampler", "dpm_solver_pp", "--sampling_steps", "20"]
    args += ["--scale", str(GUIDANCE), "--seed", "42", "--seed_per_prompt", "True", "--output_path", str(out)]
    if lora is not None:
        args += ["--use_lora", "True", "--lora_ckpt_path", str(lora)]
    run(f"generate ({'after' if lora else 'before'} LoRA)", args)


def evaluate(samples: Path, ref_stats: Path, image_prompts: Path, out_json: Path) -> dict:
    fid_json, clip_json = out_json.with_suffix(".fid.json"), out_json.with_suffix(".clip.json")
    run(
        "FID/KID",
        ["tools/eval/eval_fid.py", "--real_stats", str(ref_stats), "--gen_dir", str(samples), "--kid"]
        + ["--fid_method", "eigvals", "--quiet", "--output_json", str(fid_json)],
    )
    run(
        "CLIP score",
        ["tools/eval/eval_clip_score.py", "--image_dir", str(samples), "--prompts", str(image_prompts)]
        + ["--model_dir", str(MODEL / "clip"), "--quiet", "--output_json", str(clip_json)],
    )
    fid, clip = json.loads(fid_json.read_text()), json.loads(clip_json.read_text())
    return {"fid": fid["fid"], "kid": fid["kid_mean"], "clip": clip["clip_score"]}


def select(out: Path, lines: list[str], ref_stats: Path) -> str:
    """Run ``python -m ldm.lora select`` on the run's adapters; returns what it would ship."""
    held, prior = out / "select_prompts.txt", out / "prior_prompts.txt"
    chosen = lines[:: max(len(lines) // SELECT_PROMPTS, 1)][:SELECT_PROMPTS]
    write_text(held, "".join(f"{p}\n" for p in chosen))
    write_text(prior, "".join(f"{p.replace('a blueprint drawing of', BASE_STYLE)}\n" for p in chosen))
    args = ["-m", "ldm.lora", "select", str(out / "lora"), "--ckpt_path", str(MODEL / "tiny_sd.safetensors")]
    args += ["--prompts", str(held), "--prior_prompts", str(prior), "--real_stats", str(ref_stats)]
    args += ["--scales", *SELECT_SCALES, "--n_samples", str(SELECT_SAMPLES), "--guidance", str(GUIDANCE)]
    args += ["--size", "64", "--rank_by", "kid", "--clip_model_dir", str(MODEL / "clip")]
    args += ["--output_dir", str(out / "selection")]
    run("select adapter and scale", args)
    best = json.loads((out / "selection/selection.json").read_text(encoding="utf-8"))["best"]
    return "the base model (no adapter)" if best["path"] is None else f"{best['label']} at scale {best['scale']:g}"


def validation_curve(metrics: Path) -> str:
    """The held-out validation loss per step, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    points = ", ".join(f"{r['step']}: {r['val_loss']:.4f}" for r in rows if "val_loss" in r)
    return f"validation loss (held-out {VALIDATION_SPLIT:.0%} of the images) by step: {points}"


def side_by_side(before: Path, after: Path, path: Path, columns: int = SAMPLES_PER_PROMPT, n_rows: int = 8) -> None:
    """One image: the first ``n_rows`` prompts' samples before LoRA (left) and after (right), one prompt per row."""
    from PIL import Image

    rows = []
    for folder in (before, after):
        rows.append(sorted(p for p in folder.glob("*.png")))
    size = Image.open(rows[0][0]).size[0]
    n_rows = min(n_rows, len(rows[0]) // columns)
    gap = size // 4
    grid = Image.new("RGB", (2 * columns * size + gap, n_rows * size), "white")
    for side, files in enumerate(rows):
        for i, f in enumerate(files[: n_rows * columns]):
            x = side * (columns * size + gap) + (i % columns) * size
            grid.paste(Image.open(f).convert("RGB"), (x, (i // columns) * size))
    save_image(path, grid)


def main() -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_path", default="output/demo")
    parser.add_argument("--max_train_steps", type=int, help="override the recipe's step count")
    args = parser.parse_args()
    out = (ROOT / args.output_path).resolve()
    for previous in (
        "before",
        "after",
        "lora",
        "selection",
    ):  # a rerun starts clean: sample numbering must match the prompts
        if (out / previous).exists():
            print(f"removing the previous demo run's {out / previous}")
            shutil.rmtree(out / previous)
    out.mkdir(parents=True, exist_ok=True)

    import numpy as np

    import ldm  # noqa: F401  (CPU defaults before mindspore)
    from ldm.metrics.fid import save_stats

    ref_stats = out / f"{CONCEPT}_test_stats.npz"
    reference = np.load(MODEL / f"data/{CONCEPT}_test_inception_features.npz")["features"]
    save_stats(str(ref_stats), reference)
    prompts = MODEL / f"data/{CONCEPT}_prompts.txt"
    lines = [p for p in prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
    image_prompts = out / "image_prompts.txt"  # one line per sample, in the samples' file order
    write_text(image_prompts, "".join(f"{p}\n" * SAMPLES_PER_PROMPT for p in lines))

    generate(out / "before", prompts, None)
    train = ["examples/stable_diffusion_v2/train_text_to_image.py", "--train_config", str(TRAIN_CONFIG)]
    train += ["--data_path", str(MODEL / f"data/{CONCEPT}_train"), "--output_path", str(out / "lora")]
    train += ["--pretrained_model_path", str(MODEL / "tiny_sd.safetensors")]
    train += ["--validation_split", str(VALIDATION_SPLIT), "--validation_loss_steps", str(VALIDATION_EVERY)]
    train += ["--ckpt_save_interval", str(CKPT_EVERY)]
    if args.max_train_steps:
        train += ["--max_train_steps", str(args.max_train_steps)]
    run("LoRA fine-tune", train)
    lora = max((out / "lora/ckpt").glob("lora-*.safetensors"))
    generate(out / "after", prompts, lora)
    shipped = select(out, lines, ref_stats)

    before = evaluate(out / "before/samples", ref_stats, image_prompts, out / "before")
    after = evaluate(out / "after/samples", ref_stats, image_prompts, out / "after")
    grid = out / "before_after.png"
    side_by_side(out / "before/samples", out / "after/samples", grid)

    n = len(lines) * SAMPLES_PER_PROMPT
    print(f"\nheld-out concept {CONCEPT!r}: {n} samples per side vs {len(reference)} held-out test images (FID/KID)")
    print(f"{'':8}{'FID':>10}{'KID':>10}{'CLIP':>10}")
    for name, r in (("before", before), ("after", after)):
        print(f"{name:8}{r['fid']:10.2f}{r['kid']:10.4f}{r['clip']:10.2f}")
    print(f"grids: before {out / 'before'}/grid-*.png, after {out / 'after'}/grid-*.png, side by side {grid}")
    print(f"demo time: {time.monotonic() - start:.0f} s")
    print(f"LoRA: {lora}; loss plot {out / 'lora/loss.png'}; validation grids {out / 'lora/validation'}")
    print(validation_curve(out / "lora/metrics.jsonl"))
    print(f"selection ({out / 'selection'}): would ship {shipped}")
    print(
        f"FID before={before['fid']:.2f} after={after['fid']:.2f} KID before={before['kid']:.4f} "
        f"after={after['kid']:.4f} CLIP before={before['clip']:.2f} after={after['clip']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
