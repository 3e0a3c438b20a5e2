"""Generate images from text prompts with Stable Diffusion 1.5/2.x, optionally with LoRA adapters merged in.

    python examples/stable_diffusion_v2/text_to_image.py --prompt "a red fox" --ckpt_path sd21.safetensors \
        [--use_lora True --lora_ckpt_path a.safetensors --lora_scale 0.8] [--sampler dpm_solver_pp]

Writes ``<output_path>/samples/NNNNN.png`` (+ ``NNNNN.json`` with the settings and per-image seed) and one
``<output_path>/grid-<k>.png`` per prompt. Without ``--H``/``--W``/``--scale`` the model config decides (its image
size times the VAE factor; guidance 7.5 for SD1, 9.0 for SD2). Errors are one ``error: ...`` line on stderr with exit
status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import Parser, add_allow_pickle, run, str2bool
from ldm.generate import GenerationError, GenerationJob, generate, read_prompts, validate_job
from ldm.names import SAMPLER_NAMES
from ldm.precision import PRECISIONS
from ldm.util import VERSIONS, check_output_folder


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--data_path", help="text file with one prompt per line")
    p.add_argument("--negative_prompt", default="", help="negative prompt for every image (default empty)")
    p.add_argument("--config", help="model YAML config (overrides --version)")
    p.add_argument("--version", choices=list(VERSIONS), help="bundled config of this SD version (default 2.1)")
    p.add_argument("--ckpt_path", help="weights: our/Stability single file or a diffusers folder (omit: random)")
    add_allow_pickle(p)
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpm_solver_pp")
    p.add_argument("--sampling_steps", type=int, default=20)
    p.add_argument("--scale", type=float, help="guidance scale (default: 9.0 for SD2, 7.5 for SD1)")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--n_samples", type=int, default=1, help="batch size per prompt")
    p.add_argument("--n_iter", type=int, default=2, help="batches per prompt; iteration i uses seed + i")
    p.add_argument("--H", type=int, help="image height (default: the model config's native size)")
    p.add_argument("--W", type=int, help="image width (default: the model config's native size)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--seed_per_prompt",
        type=str2bool,
        default=False,
        help="True: prompt k's iteration i uses seed + k * n_iter + i, so no two prompts share noise (sample sets for "
        "FID); default: every prompt uses the same seeds (compare prompts)",
    )
    p.add_argument("--use_lora", type=str2bool, default=False, help="merge the --lora_ckpt_path adapters (True)")
    p.add_argument("--lora_ckpt_path", action="append", default=[], help="LoRA adapter file (repeatable)")
    p.add_argument("--lora_scale", type=float, action="append", help="scale per adapter (repeatable; default 1.0)")
    p.add_argument(
        "--lora_ft_text_encoder", type=str2bool, default=False, help="also merge the adapters' text-encoder modules"
    )
    p.add_argument("--output_path", default="output/")
    p.add_argument("--device_target", choices=("CPU", "GPU", "Ascend"), default="CPU")
    p.add_argument("--mode", type=int, choices=(0, 1), default=0, help="0 graph (default), 1 pynative")
    p.add_argument(
        "--attention_slice_size",
        type=int,
        default=0,
        help="attention over this many batch x head rows at a time (0: all)",
    )
    p.add_argument("--vae_slicing", type=str2bool, default=False, help="decode one image of a batch at a time")
    p.add_argument(
        "--vae_tile_latent_size", type=int, default=0, help="decode in overlapping tiles of this many latents (0: off)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="compute dtype of the UNet and by default the text encoder (fp32; norms and softmax stay fp32)",
    )
    p.add_argument("--use_fp16", type=str2bool, default=False, help="mindone's alias: True means --precision fp16")
    p.add_argument(
        "--vae_precision",
        choices=PRECISIONS,
        help="VAE compute dtype (default: fp32 under an fp16 UNet, else the UNet's)",
    )
    p.add_argument(
        "--text_encoder_precision", choices=PRECISIONS, help="text encoder compute dtype (default: the UNet's)"
    )
    p.add_argument(
        "--enable_flash_attention",
        type=str2bool,
        default=False,
        help="fused FlashAttentionScore kernel in the UNet (Ascend only; elsewhere a warning and the standard path)",
    )
    return p


def _precision(args: argparse.Namespace) -> str:
    """``--precision``, or fp16 from mindone's ``--use_fp16 True``; both at odds is an error."""
    if args.use_fp16 and args.precision not in (None, "fp16"):
        raise GenerationError(f"--use_fp16 True conflicts with --precision {args.precision}; give only one of them")
    return "fp16" if args.use_fp16 else args.precision or "fp32"


def job_from_args(args: argparse.Namespace) -> GenerationJob:
    prompts = read_prompts(args.data_path) if args.data_path else [args.prompt]
    if not prompts[0].strip():
        raise GenerationError("--prompt is empty")
    adapters = list(args.lora_ckpt_path) if args.use_lora else []
    if args.lora_ckpt_path and not args.use_lora:
        print("note: --lora_ckpt_path given without --use_lora True: adapters are not applied", file=sys.stderr)
    if args.use_lora and not adapters:
        raise GenerationError("--use_lora True needs at least one --lora_ckpt_path")
    return GenerationJob(
        prompts=prompts,
        negative_prompt=args.negative_prompt,
        config=args.config,
        version=args.version,
        ckpt_path=args.ckpt_path,
        allow_pickle=args.allow_pickle,
        sampler=args.sampler,
        sampling_steps=args.sampling_steps,
        scale=args.scale,
        ddim_eta=args.ddim_eta,
        n_samples=args.n_samples,
        n_iter=args.n_iter,
        height=args.H,
        width=args.W,
        seed=args.seed,
        seed_per_prompt=args.seed_per_prompt,
        lora_ckpt_paths=adapters,
        lora_scales=args.lora_scale if adapters else None,
        lora_ft_text_encoder=args.lora_ft_text_encoder,
        output_path=args.output_path,
        attention_slice_size=args.attention_slice_size,
        vae_slicing=args.vae_slicing,
        vae_tile_latent_size=args.vae_tile_latent_size,
        precision=_precision(args),
        vae_precision=args.vae_precision,
        text_encoder_precision=args.text_encoder_precision,
        enable_flash_attention=args.enable_flash_attention,
    )


def _generate(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    validate_job(job)  # fail fast, before MindSpore is imported
    check_output_folder(job.output_path, "--output_path")
    from ldm.env import init_env

    init_env(args.device_target, mode=args.mode, seed=args.seed)
    generate(job)
    return 0


def main(argv=None) -> int:
    return run(build_parser(), _generate, argv)


if __name__ == "__main__":
    sys.exit(main())
