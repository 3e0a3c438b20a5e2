"""CLIP score of generated images against their prompts, in MindSpore.

    python tools/eval/eval_clip_score.py --image_dir outputs/samples --prompts prompts.txt \
        --model_dir clip-vit-base-patch16 [--clip_mode per_sample|mean|none] [--output_json clip.json]

Line i of the prompts file belongs to image i in sorted file-name order (mindone's spellings
--image_path_or_dir / --prompt_or_path / --ckpt_path are accepted too; a --prompts value that is not a file is the
prompt of every image). --model_dir is a Hugging Face CLIP folder
(config.json + model.safetensors); or give --model (preset) and --ckpt (HF-named .safetensors/.ckpt).
Errors print one line and exit 2. See tools/eval/README.md for the clipping conventions.
"""

from __future__ import annotations

import os
import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import Parser, call, debug_requested, str2bool
from ldm.names import DEVICE_TARGETS


def parse_args(argv=None):
    from ldm.metrics.clip import PRESETS
    from ldm.metrics.clip_score import CLIP_MODES

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--image_dir",
        "--image_path_or_dir",
        dest="image_dir",
        required=True,
        help="folder of images (sorted by file name) or one image file",
    )
    p.add_argument(
        "--prompts",
        "--prompt_or_path",
        dest="prompts",
        required=True,
        help="text file, one prompt per line aligned with the sorted images; any other value is taken as "
        "the prompt of every image",
    )
    p.add_argument("--model_dir", help="Hugging Face CLIP folder with config.json and model.safetensors")
    p.add_argument("--model", default="vit-b-16", choices=sorted(PRESETS), help="architecture when no --model_dir")
    p.add_argument(
        "--ckpt",
        "--ckpt_path",
        dest="ckpt",
        help="weights with transformers CLIPModel names (.safetensors or MindSpore .ckpt)",
    )
    p.add_argument("--clip_mode", default="per_sample", choices=CLIP_MODES, help="where max(., 0) is applied")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--output_json", help="write the score and the per-image scores here")
    p.add_argument("--device_target", default="CPU", choices=DEVICE_TARGETS)
    p.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0 graph (default), 1 PyNative")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--compile_cache",
        type=str2bool,
        default=True,
        help="graph mode: reuse the compiled CLIP graphs of an earlier run with the same model and batch sizes "
        "($LDM_CACHE_DIR/compile; False: off)",
    )
    return p.parse_args(argv)


def _evaluate(argv) -> int:
    args = parse_args(argv)
    if args.output_json:
        from ldm.util import check_output_folder

        check_output_folder(os.path.dirname(os.path.abspath(args.output_json)), "--output_json")
    from ldm.metrics.evaluate import evaluate_clip_score

    options = {k: v for k, v in vars(args).items() if k not in ("output_json", "quiet", "debug")}
    result = evaluate_clip_score(**options, progress=not args.quiet)
    print(f"CLIP score ({result['clip_mode']} clipping, {result['num_pairs']} pairs): {result['clip_score']:.4f}")
    if args.output_json:
        from ldm.atomic import write_json

        write_json(args.output_json, result)
    return 0


def main(argv=None) -> int:
    return call(lambda: _evaluate(argv), debug=debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
