"""FID (and optionally KID) between a folder of real images and a folder of generated images, in MindSpore.

    python tools/eval/eval_fid.py --real_dir data/real --gen_dir outputs/samples [--kid] [--output_json fid.json]

Weights: the TF "inception-2015-12-05" FID network, read from --inception_ckpt or the cache (see
tools/eval/README.md); images are resized to 299 with TF1-compatible bilinear. Errors print one line and exit 2.
"""

from __future__ import annotations

import os
import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import Parser, call, debug_requested, str2bool
from ldm.names import DEVICE_TARGETS


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real_dir", help="folder of reference images (PNG/JPG/..., any size and mode)")
    p.add_argument("--gen_dir", required=True, help="folder of generated images")
    p.add_argument(
        "--real_stats",
        help=".npz of real-set statistics: read if it exists (then --real_dir may be omitted), else written from "
        "--real_dir. pytorch-fid mu/sigma files are accepted (FID only)",
    )
    p.add_argument("--inception_ckpt", help="converted checkpoint, or a .pt/.pth/.whl source (default: the cache)")
    p.add_argument("--batch_size", type=int, default=16, help="graph mode on CPU: ~6 GB peak RSS at 16")
    p.add_argument(
        "--fid_method",
        default="sqrtm",
        choices=["sqrtm", "eigvals"],
        help="sqrtm (pytorch-fid, default) or eigvals (torchmetrics; same value, ~10x faster on CPU)",
    )
    p.add_argument("--kid", action="store_true", help="also compute KID (cubic polynomial kernel, random subsets)")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000, help="capped at the smaller set size")
    p.add_argument("--output_json", help="write the results here")
    p.add_argument("--device_target", default="CPU", choices=DEVICE_TARGETS)
    p.add_argument("--mode", type=int, default=0, choices=[0, 1], help="0 graph (default), 1 PyNative")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--compile_cache",
        type=str2bool,
        default=True,
        help="graph mode: reuse the compiled Inception graphs of an earlier run with the same batch shapes "
        "($LDM_CACHE_DIR/compile; False: off)",
    )
    args = p.parse_args(argv)
    if not args.real_dir and not (args.real_stats and os.path.isfile(args.real_stats)):
        p.error("--real_dir is required unless --real_stats names an existing file")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    return args


def _evaluate(argv) -> int:
    args = parse_args(argv)
    if args.output_json:
        from ldm.util import check_output_folder

        check_output_folder(os.path.dirname(os.path.abspath(args.output_json)), "--output_json")
    from ldm.metrics.evaluate import evaluate_fid

    options = {k: v for k, v in vars(args).items() if k not in ("output_json", "quiet", "debug")}
    result = evaluate_fid(**options, progress=not args.quiet)
    print(f"FID: {result['fid']:.4f}  (real {result['num_real']}, generated {result['num_gen']})")
    if min(n for n in (result["num_real"], result["num_gen"]) if n) <= 2048:
        print("note: with <= 2048 images the covariance is rank-deficient; FID is biased upward, compare at equal N")
    if "kid_mean" in result:
        print(f"KID: {result['kid_mean']:.6f} +- {result['kid_std']:.6f}")
    if args.output_json:
        from ldm.atomic import write_json

        write_json(args.output_json, result)
    return 0


def main(argv=None) -> int:
    return call(lambda: _evaluate(argv), debug=debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
