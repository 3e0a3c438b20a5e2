"""Fine-tune Stable Diffusion with LoRA (or the whole UNet) from a YAML config; see ``-h`` for every option.

    python examples/stable_diffusion_v2/train_text_to_image.py --train_config configs/train/train_config_lora_v2.yaml \
        --data_path DATA --output_path OUT --pretrained_model_path MODEL

Options, paths and the model config are checked before MindSpore starts; errors are one ``error:`` line (exit 2),
``--debug`` shows the traceback.
"""

import logging
import sys

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.cli import call, debug_requested
from ldm.env import check_launcher
from ldm.train.options import check_paths, parse_options, resolve_train_config


def _train(opts) -> int:
    if opts.use_parallel:
        check_launcher()
    check_paths(opts)
    resolved = resolve_train_config(opts)
    logging.getLogger("ldm.train").info("model config: %s", resolved.label)
    from ldm.train.trainer import run_training  # starts MindSpore

    summary = run_training(opts, resolved.config)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return call(lambda: _train(parse_options(argv)), debug=debug_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
