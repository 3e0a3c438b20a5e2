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

import json
import os
import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import Parser, call, debug_requested


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
    p.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    p.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0 graph (default), 1 PyNative")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


class InputError(ValueError):
    """Bad command-line input (images, prompts, weights)."""


def read_prompts(path: str) -> list[str]:
    """Line i is the prompt of image i; trailing blank lines are dropped, a blank line before them is an error."""
    from ldm.util import read_text_utf8

    try:
        lines = read_text_utf8(path).splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read prompts ({exc.strerror})") from exc
    except ValueError as exc:
        raise InputError(str(exc)) from None
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        raise InputError(f"{path}:{blank[0]}: blank prompt line (line i is the prompt of image i)")
    return lines


def weights_path(args) -> str:
    path = args.ckpt or (os.path.join(args.model_dir, "model.safetensors") if args.model_dir else None)
    if path is None or not os.path.isfile(path):
        hf = "openai/clip-vit-base-patch16"
        raise InputError(
            f"CLIP weights not found ({path or 'no --model_dir or --ckpt given'}). Download a Hugging Face CLIP "
            f"model, e.g. `huggingface-cli download {hf} config.json model.safetensors --local-dir clip-b16`, "
            "and pass --model_dir clip-b16"
        )
    return path


def run(args) -> dict:
    from ldm.env import init_env
    from ldm.metrics.clip import CLIPModel, load_clip_state_dict, load_config
    from ldm.metrics.clip_score import aggregate, cosine_scores, embed_pairs
    from ldm.metrics.fid import check_images, list_images

    paths = [args.image_dir] if os.path.isfile(args.image_dir) else list_images(args.image_dir)
    if not paths:
        raise InputError(f"image folder {args.image_dir} has no images")
    prompts = read_prompts(args.prompts) if os.path.isfile(args.prompts) else [args.prompts] * len(paths)
    if len(prompts) != len(paths):
        raise InputError(
            f"{args.prompts} has {len(prompts)} prompts but {args.image_dir} has {len(paths)} images; "
            "line i must be the prompt of image i in sorted file-name order"
        )
    check_images(paths)
    ckpt = weights_path(args)
    cfg = load_config(args.model_dir or args.model)
    init_env(args.device_target, mode=args.mode)
    from PIL import Image

    from ldm.io.checkpoint import read_state_dict
    from ldm.tokenizer import CLIPTokenizer

    model = CLIPModel(cfg)
    load_clip_state_dict(model, read_state_dict(ckpt), ckpt)
    model.set_train(False)
    images = [Image.open(p) for p in paths]
    img_emb, txt_emb = embed_pairs(model, CLIPTokenizer(), images, prompts, args.batch_size, not args.quiet)
    scores = cosine_scores(img_emb, txt_emb)
    return {
        "clip_score": aggregate(scores, args.clip_mode),
        "clip_mode": args.clip_mode,
        "model": args.model_dir or args.model,
        "weights": ckpt,
        "num_pairs": len(paths),
        "per_image": [
            {"image": os.path.basename(p), "prompt": t, "score": float(s)} for p, t, s in zip(paths, prompts, scores)
        ],
    }


def _evaluate(argv) -> int:
    args = parse_args(argv)
    if args.output_json:
        from ldm.util import check_output_folder

        check_output_folder(os.path.dirname(os.path.abspath(args.output_json)), "--output_json")
    result = run(args)
    print(f"CLIP score ({result['clip_mode']} clipping, {result['num_pairs']} pairs): {result['clip_score']:.4f}")
    if args.output_json:
        tmp = f"{args.output_json}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.output_json)
    return 0


def main(argv=None) -> int:
    return call(lambda: _evaluate(argv), debug=debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
