"""Convert the PyTorch-trained tiny family into the files the project ships (fp16 safetensors, MindSpore-loadable).

    python tools/tiny_sd/export_tiny_sd.py output/tiny_sd_torch models/tiny_sd [--overwrite]

* ``tiny_sd.safetensors``: the diffusers folder (unet/vae/text_encoder/scheduler) through ``python -m ldm.convert
  --dtype float16``, which builds our model from the folder's configs, loads every weight strictly and embeds the
  model config, so ``text_to_image.py --ckpt_path`` and training need no ``--config``.
* ``clip/``: the transformers CLIP folder's ``config.json`` and its weights, loaded strictly into our MindSpore
  ``ldm.metrics.clip.CLIPModel`` (the model ``tools/eval/eval_clip_score.py --model_dir`` builds) and written as fp16.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def export_clip(src: Path, dst: Path) -> None:
    """Strict load into our CLIP, then the same tensors as fp16 (minus the unused ``position_ids`` buffers)."""
    import numpy as np

    from ldm.env import init_env
    from ldm.io.checkpoint import read_state_dict, write_state_dict
    from ldm.metrics.clip import IGNORED_KEYS, CLIPModel, load_clip_state_dict, load_config

    init_env("CPU", mode=1)
    weights = {k: v for k, v in read_state_dict(src / "model.safetensors").items() if k not in IGNORED_KEYS}
    load_clip_state_dict(CLIPModel(load_config(str(src))), weights, str(src / "model.safetensors"))
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    write_state_dict(dst / "model.safetensors", {k: v.astype(np.float16) for k, v in weights.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="output folder of train_tiny_sd.py")
    p.add_argument("dst", help="folder for tiny_sd.safetensors and clip/")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    target = dst / "tiny_sd.safetensors"
    dst.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ldm.convert", str(src), str(target), "--dtype", "float16"]
    rc = subprocess.call(cmd + (["--overwrite"] if args.overwrite else []), cwd=ROOT)
    if rc:
        return rc
    export_clip(src / "clip", dst / "clip")
    print(f"wrote {dst / 'clip'}")
    return 0


if __name__ == "__main__":
    import ldm  # noqa: F401  (CPU defaults before mindspore)

    sys.exit(main())
