"""Convert Stable Diffusion checkpoints between diffusers folders, Stability/CompVis single files and ours.

    python -m ldm.convert SRC DST [--config CFG | --version 2.1] [--allow-pickle] [--overwrite] [--dtype float16]

SRC is a diffusers folder (its config.json files describe the model) or a single file (``.safetensors``,
MindSpore ``.ckpt``; PyTorch pickles only with ``--allow-pickle``), which needs ``--config``/``--version`` unless it
is one of our files with an embedded config. DST ending in ``.safetensors``/``.ckpt`` is written in our
(original-LDM) names, any other DST as a diffusers folder. The weights are loaded strictly into the model built from
the config before anything is written, so a missing, unexpected or mis-shaped key fails by name and leaves DST
untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.io.checkpoint import CheckpointError
from ldm.util import VERSIONS, ConfigError, config_for_version, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="diffusers folder or single checkpoint file")
    parser.add_argument("dst", help="*.safetensors / *.ckpt (our names) or a folder path (diffusers layout)")
    parser.add_argument("--config", help="model YAML config (e.g. configs/v2-inference.yaml)")
    parser.add_argument("--version", choices=sorted(VERSIONS), help="use the bundled config of this SD version")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read PyTorch pickle checkpoints (.ckpt/.pt/.bin) with a restricted unpickler that only "
        "rebuilds tensors; only for files you trust",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the written single file (default float32)",
    )
    return parser.parse_args(argv)


def _resolve_config(args: argparse.Namespace):
    from ldm.io.diffusers_format import config_from_diffusers, is_diffusers_folder
    from ldm.io.model_io import config_from_checkpoint

    if args.config:
        return load_config(args.config)
    if args.version:
        return load_config(config_for_version(args.version))
    if is_diffusers_folder(args.src):
        return config_from_diffusers(args.src)
    embedded = config_from_checkpoint(args.src)
    if embedded is None:
        raise ConfigError(f"{args.src}: cannot tell the model architecture; pass --config or --version")
    return embedded


def convert(args: argparse.Namespace) -> Path:
    from ldm.env import init_env
    from ldm.io.diffusers_format import write_diffusers_folder
    from ldm.io.loading import cell_state_dict
    from ldm.io.model_io import load_pretrained, save_model
    from ldm.models.diffusion import build_model_from_config

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    if not Path(args.src).exists():
        raise CheckpointError(f"{args.src}: no such file or folder")
    config = _resolve_config(args)
    init_env("CPU", mode=1)
    model = build_model_from_config(config)
    load_pretrained(model, args.src, allow_pickle=args.allow_pickle)
    if dst.suffix.lower() in (".safetensors", ".ckpt"):
        save_model(model, dst, config=config, dtype=args.dtype)
    else:
        write_diffusers_folder(cell_state_dict(model), config, dst, overwrite=args.overwrite)
    return dst


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dst = convert(args)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
