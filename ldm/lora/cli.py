"""``python -m ldm.lora {export,import,merge,combine,select}``: LoRA adapter files on the command line.

export: our adapter -> diffusers/PEFT or kohya file, or a PEFT folder; import: the reverse; merge: fold an adapter
into a full checkpoint; combine: two adapters into one (exact SVD or cloneofsimo's lpl); select: score a run's
adapters at several scales (FID/KID, CLIP score, prior drift) and name the one to ship (:mod:`ldm.metrics.selection`).
``-h`` on each command lists its options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli import Parser, add_allow_pickle, run
from ldm.io.checkpoint import CheckpointError, read_metadata, read_state_dict, write_state_dict
from ldm.lora.adapter import parse, product_delta, read_adapter, write_adapter
from ldm.lora.any_format import FORMATS, read_any_adapter
from ldm.lora.interop import UNetLayout, to_diffusers, to_kohya
from ldm.lora.merge import combine_lpl, combine_svd, merge_into_base
from ldm.lora.peft_folder import write_peft_folder
from ldm.names import FAMILIES, family_of_config

PROG = "python -m ldm.lora"


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_layout(p: Parser) -> None:
    g = p.add_argument_group("UNet layout (for the LDM <-> diffusers block map; defaults: SD 1.x/2.x)")
    g.add_argument(
        "--config",
        help="model YAML config; takes the layout (and family) from it instead of the options "
        "below, e.g. ldm/configs/tiny/sd2-tiny.yaml",
    )
    g.add_argument("--num_res_blocks", type=int, default=2, help="ResBlocks per level (default 2)")
    g.add_argument("--channel_mult", type=_int_list, default=(1, 2, 4, 4), help="channel multipliers (default 1,2,4,4)")
    g.add_argument(
        "--attention_resolutions",
        type=_int_list,
        default=(4, 2, 1),
        help="downsampling factors with attention (default 4,2,1)",
    )
    g.add_argument("--transformer_depth", type=int, default=1, help="transformer blocks per attention (default 1)")


def _layout_and_family(args) -> tuple:
    """(UNetLayout, family or None) from --config or the layout options."""
    if not args.config:
        return UNetLayout(
            args.num_res_blocks, args.channel_mult, args.attention_resolutions, args.transformer_depth
        ), None
    from ldm.util import load_config

    cfg = load_config(args.config)
    try:
        return UNetLayout.from_config(cfg), family_of_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{args.config}: not a model config with unet_config/cond_stage_config: {e}") from None


def _check_out(path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass --overwrite to replace it)")
    if path.suffix.lower() != ".safetensors" and path.suffix.lower() != ".ckpt":
        raise CheckpointError(f"{path}: output must end in .safetensors (or .ckpt for merge)")
    return path


def _command(sub, name: str, summary: str, description: str, **positionals: str) -> Parser:
    """A subcommand with its positional files (name -> help) and ``--overwrite`` for its output."""
    p = sub.add_parser(name, help=summary, description=description)
    for arg, text in positionals.items():
        p.add_argument(arg, help=text)
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    return p


def build_parser(prog: str = PROG) -> Parser:
    parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = _command(
        sub,
        "export",
        "our adapter -> diffusers/PEFT or kohya file, or a PEFT folder",
        "Write one of our LoRA adapters as a diffusers/PEFT or kohya .safetensors file, or as a PEFT folder.",
        src="our adapter (.safetensors with ldm_lora metadata)",
        dst="output .safetensors (a folder for --format peft)",
    )
    p.add_argument(
        "--format",
        choices=("diffusers", "kohya", "peft"),
        required=True,
        help="diffusers: unet.<path>.lora_A/lora_B (+ lora_adapter_metadata with alpha); kohya: "
        "lora_unet_*/lora_te_* with .alpha; peft: folder with unet/ and text_encoder/, each "
        "adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained)",
    )
    p.add_argument(
        "--fold_scale",
        action="store_true",
        help="diffusers only: multiply lora_B by alpha/r and write no PEFT metadata, for loaders that "
        "ignore lora_adapter_metadata",
    )
    _add_layout(p)

    p = _command(
        sub,
        "import",
        "diffusers/PEFT or kohya file, or a PEFT folder -> our adapter",
        "Convert a diffusers/PEFT or kohya LoRA .safetensors file, a PEFT folder (adapter_config.json + "
        "adapter_model.safetensors) or a run folder holding unet/ and/or text_encoder/ ones to our adapter format.",
        src="diffusers/PEFT or kohya LoRA .safetensors, or a PEFT (run) folder",
        dst="output .safetensors (our format)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="input format (default: peft for a folder, else detected from the key names)",
    )
    p.add_argument(
        "--family",
        choices=FAMILIES,
        help="sd1 or sd2 (text-encoder layout); default from --config or kohya's ss_v2 metadata",
    )
    p.add_argument("--context_dim", type=int, help="stored in the ldm_lora metadata")
    p.add_argument("--parameterization", choices=("eps", "v"), help="stored in the ldm_lora metadata")
    p.add_argument(
        "--skip_conv",
        action="store_true",
        help="drop conv LoRA modules with kernels > 1x1 (LoCon's 3x3) with a warning instead of importing them",
    )
    _add_layout(p)

    p = _command(
        sub,
        "merge",
        "fold an adapter into a full checkpoint",
        "Write BASE with W += WEIGHT * alpha/r * up @ down for every LoRA module.",
        base="full checkpoint in our (original-LDM) names: .safetensors or .ckpt",
        lora="our adapter",
        out="output checkpoint (.safetensors or MindSpore .ckpt)",
    )
    p.add_argument("--weight", type=float, default=1.0, help="strength multiplier (default 1.0)")
    add_allow_pickle(p, "BASE checkpoints")

    p = _command(
        sub,
        "combine",
        "combine two adapters (svd: exact sum then truncated SVD; lpl: factor sum)",
        "Combine two of our adapters into one.",
        a="first adapter",
        b="second adapter",
        out="output adapter .safetensors",
    )
    p.add_argument(
        "--mode",
        choices=("svd", "lpl"),
        default="svd",
        help="svd: w1*dW_a + w2*dW_b truncated to --rank (error reported); lpl: cloneofsimo's weighted "
        "sum of ups and of downs (approximate, same ranks needed). Default svd",
    )
    p.add_argument("--w1", type=float, default=1.0, help="weight of the first adapter (default 1.0)")
    p.add_argument("--w2", type=float, default=1.0, help="weight of the second adapter (default 1.0)")
    p.add_argument("--rank", type=int, help="svd: rank of the result (default rank_a + rank_b: exact)")
    _add_select(sub)
    return parser


def _add_select(sub) -> None:
    p = sub.add_parser(
        "select",
        help="pick the adapter and scale to ship by FID/KID, CLIP score and prior drift",
        description="Generate held-out prompts (quality) and unrelated prompts (prior drift: how far the adapter "
        "moves images it was not trained for) at fixed seeds with the base model and with every adapter x scale; "
        "print a table, mark the best by the stated rule and the Pareto front, write selection.json and "
        "selection.png (metric per step, one line per scale) into --output_dir.",
    )
    p.add_argument("sources", nargs="+", help="run folders (their ckpt/lora-<step>.safetensors) or adapter files")
    p.add_argument("--ckpt_path", required=True, help="base model weights (our/Stability file or diffusers folder)")
    p.add_argument("--config", help="model YAML (default: the one the weights carry)")
    p.add_argument("--prompts", required=True, help="held-out prompts, one per line (quality: FID/KID, CLIP)")
    p.add_argument("--prior_prompts", required=True, help="unrelated prompts, one per line (prior drift)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--real_stats", help="Inception features of real images (.npz from eval_fid.py --save_stats)")
    ref.add_argument("--real_dir", help="folder of real images of the concept")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="LoRA strengths to try (default 1.0)")
    p.add_argument("--n_samples", type=int, default=2, help="images per prompt, seeds seed+k (default 2)")
    p.add_argument("--seed", type=int, default=42, help="seed of prompt 0 (default 42)")
    p.add_argument("--sampling_steps", type=int, default=20, help="DPM-Solver++ steps (default 20)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the family's)")
    p.add_argument("--size", type=int, help="image height and width (default: the model's native size)")
    p.add_argument("--rank_by", choices=("fid", "kid", "clip"), default="fid", help="quality metric (default fid)")
    p.add_argument("--max_drift", type=float, help="only candidates with at most this prior drift may be best")
    p.add_argument("--clip_model_dir", help="Hugging Face CLIP folder for CLIP score (config.json, model.safetensors)")
    p.add_argument("--inception_ckpt", help="FID Inception weights (default: the cache, see tools/eval/eval_fid.py)")
    p.add_argument("--output_dir", required=True, help="where selection.json and selection.png go")
    p.add_argument("--device_target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    p.add_argument("--mode", type=int, default=0, choices=(0, 1), help="0 graph (default), 1 PyNative")


def _select(args) -> str:
    from ldm.generate_options import read_prompts
    from ldm.metrics.fid_weights import resolve
    from ldm.util import check_output_folder

    prompts, prior_prompts = read_prompts(args.prompts), read_prompts(args.prior_prompts)
    if args.n_samples * len(prompts) < 2:
        raise ValueError(f"{args.prompts}: FID needs at least 2 images; give more prompts or a larger --n_samples")
    check_output_folder(args.output_dir, "--output_dir")
    resolve(args.inception_ckpt)  # missing weights fail before any model is built
    from ldm.metrics.select_run import SelectJob, run_select

    job = SelectJob(
        sources=args.sources,
        ckpt_path=args.ckpt_path,
        config=args.config,
        prompts=prompts,
        prior_prompts=prior_prompts,
        output_dir=args.output_dir,
        scales=tuple(args.scales),
        real_stats=args.real_stats,
        real_dir=args.real_dir,
        inception_ckpt=args.inception_ckpt,
        clip_model_dir=args.clip_model_dir,
        n_samples=args.n_samples,
        seed=args.seed,
        sampling_steps=args.sampling_steps,
        guidance=args.guidance,
        size=args.size,
        rank_by=args.rank_by,
        max_drift=args.max_drift,
        device_target=args.device_target,
        mode=args.mode,
    )
    result = run_select(job)
    return f"wrote {result['json']} and {result['plot']}"


def _run(args) -> str:
    if args.command == "select":
        return _select(args)
    if args.command == "export":
        if args.fold_scale and args.format != "diffusers":
            raise CheckpointError(f"--fold_scale applies to --format diffusers only, not {args.format}")
        dst = Path(args.dst) if args.format == "peft" else _check_out(args.dst, args.overwrite)
        layout, family = _layout_and_family(args)
        adapter = read_adapter(args.src)
        if family is not None and family != adapter.meta["family"]:
            raise CheckpointError(
                f"{args.src}: adapter family {adapter.meta['family']!r} does not match {args.config} ({family})"
            )
        if args.format == "peft":
            written = write_peft_folder(dst, adapter, layout, args.overwrite)
            return f"wrote {dst} (peft: {', '.join(written)})"
        if args.format == "kohya":
            state, metadata = to_kohya(adapter, layout, args.src)
        else:
            state, metadata = to_diffusers(adapter, layout, args.fold_scale, args.src)
        write_state_dict(dst, state, metadata)
        return f"wrote {dst} ({args.format}, {len(state)} tensors)"
    if args.command == "import":
        dst = _check_out(args.dst, args.overwrite)
        layout, family = _layout_and_family(args)
        adapter, fmt = read_any_adapter(args.src, args.family or family, layout, args.format, args.skip_conv)
        if fmt == "ldm":
            raise CheckpointError(f"{args.src}: already uses our module names; nothing to import")
        family = adapter.meta["family"]
        adapter.meta.update(context_dim=args.context_dim, parameterization=args.parameterization)
        write_adapter(dst, adapter)
        return f"wrote {dst} ({_describe(adapter)}, family {family})"
    if args.command == "merge":
        out = _check_out(args.out, args.overwrite)
        adapter = read_adapter(args.lora)
        base = read_state_dict(args.base, allow_pickle=args.allow_pickle)
        metadata = read_metadata(args.base) if out.suffix.lower() == ".safetensors" else None
        write_state_dict(out, merge_into_base(base, adapter, args.weight, source=args.lora), metadata or None)
        return f"wrote {out} ({_describe(adapter)} merged, weight {args.weight})"
    out = _check_out(args.out, args.overwrite)
    a, b = read_adapter(args.a), read_adapter(args.b)
    if args.mode == "lpl":
        write_adapter(out, combine_lpl(a, b, args.w1, args.w2))
        return f"wrote {out} (lpl, w1={args.w1}, w2={args.w2}; approximate by construction)"
    rank = args.rank or _exact_rank(a) + _exact_rank(b)
    combined, report = combine_svd(a, b, args.w1, args.w2, rank)
    write_adapter(out, combined)
    worst = max(report.per_module.items(), key=lambda kv: kv[1])
    return (
        f"wrote {out} (svd rank {rank}); relative Frobenius error overall {report.overall:.3e}, "
        f"worst {worst[1]:.3e} ({worst[0]})"
    )


def _describe(adapter) -> str:
    """``N modules (lora_type)``."""
    loras, _, products = parse(adapter)
    return f"{len(loras) + len(products)} modules ({adapter.meta.get('lora_type', 'lora')})"


def _exact_rank(adapter) -> int:
    """The largest rank any module's delta can have: a LoRA's rank, a LoHa/LoKr delta's full rank."""
    loras, _, products = parse(adapter)
    ranks = [m[0].shape[0] for m in loras.values()]
    for module in products.values():
        delta = product_delta(*module)
        ranks.append(min(delta.shape[0], delta.size // delta.shape[0]))
    return max(ranks)


def _print_result(args) -> int:
    print(_run(args))
    return 0


def main(argv=None, prog: str = PROG) -> int:
    return run(build_parser(prog), _print_result, argv)
