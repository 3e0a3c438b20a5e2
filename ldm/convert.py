"""Convert Stable Diffusion checkpoints between diffusers folders, Stability/CompVis single files and ours.

    python -m ldm.convert SRC DST [--config CFG | --version 2.1] [--allow_pickle] [--overwrite] [--dtype float16]

SRC is a diffusers folder (its config.json files describe the model) or a single file (``.safetensors``,
MindSpore ``.ckpt``; PyTorch pickles only with ``--allow_pickle``), which needs ``--config``/``--version`` unless it
is one of our files with an embedded config. DST ending in ``.safetensors``/``.ckpt`` is written in our
(original-LDM) names, any other DST as a diffusers folder. The weights are checked strictly against the model built
from the config before anything is written, so a missing, unexpected or mis-shaped key fails by name and leaves DST
untouched. The model is built with uninitialised parameters and only serves as that reference: the checked arrays
are written as read (cast to the model's dtypes), so a conversion holds one copy of the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import Parser, add_allow_pickle, run
from ldm.io.checkpoint import CheckpointError
from ldm.io.model_config import resolve_model_config
from ldm.util import VERSIONS


def build_parser() -> Parser:
    parser = Parser(prog="python -m ldm.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="diffusers folder or single checkpoint file")
    parser.add_argument("dst", help="*.safetensors / *.ckpt (our names) or a folder path (diffusers layout)")
    parser.add_argument("--config", help="model YAML config (e.g. ldm/configs/v2-inference.yaml)")
    parser.add_argument("--version", choices=sorted(VERSIONS), help="use the bundled config of this SD version")
    add_allow_pickle(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="dtype of the written single file (default float32)",
    )
    return parser


def convert(args: argparse.Namespace) -> Path:
    from ldm.env import init_env
    from ldm.io.diffusers_format import write_diffusers_folder
    from ldm.io.model_io import read_pretrained, save_state_dict
    from ldm.models.diffusion import build_model_from_config

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    if not Path(args.src).exists():
        raise CheckpointError(f"{args.src}: no such file or folder")
    config = resolve_model_config(args.config, args.version, checkpoint=args.src).config
    init_env("CPU", mode=1)
    model = build_model_from_config(config, uninitialised=True)
    state = read_pretrained(model, args.src, allow_pickle=args.allow_pickle)
    if dst.suffix.lower() in (".safetensors", ".ckpt"):
        save_state_dict(state, dst, config=config, dtype=args.dtype)
    else:
        write_diffusers_folder(state, config, dst, overwrite=args.overwrite)
    return dst


def _convert_and_report(args: argparse.Namespace) -> int:
    print(f"wrote {convert(args)}")
    return 0


def main(argv=None) -> int:
    return run(build_parser(), _convert_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
