"""Fine-tune Stable Diffusion with LoRA (or the whole UNet) from a YAML config; see ``-h`` for every option.

    python examples/stable_diffusion_v2/train_text_to_image.py --train_config configs/train/train_config_lora_v2.yaml \
        --data_path DATA --output_path OUT --pretrained_model_path MODEL
"""

import logging
import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.io.checkpoint import CheckpointError
from ldm.train.options import parse_options, resolve_model_config
from ldm.train.trainer import run_training
from ldm.util import ConfigError


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_options(argv)
        summary = run_training(opts, resolve_model_config(opts))
    except (ConfigError, CheckpointError, ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
