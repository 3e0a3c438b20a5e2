"""`make demo`: the main job end to end on the embedded tiny model, no downloads.

Draws a small captioned image set, saves a randomly initialised tiny SD2-shaped base model, LoRA fine-tunes it with
configs/train/train_config_lora_tiny.yaml, and says where the adapter, metrics log and loss plot are.
"""

import argparse
import sys
from pathlib import Path

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.data.synthetic import make_shapes_dataset
from ldm.env import init_env
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.train.options import parse_options, resolve_train_config
from ldm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_path", default="output/demo")
    parser.add_argument("--max_train_steps", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.output_path)
    data = make_shapes_dataset(out / "data", count=32, size=32)
    config_file = ROOT / "configs/train/train_config_lora_tiny.yaml"
    base = out / "base_model.safetensors"
    init_env("CPU", mode=1, seed=0)
    opts = parse_options(
        [
            "--train_config",
            str(config_file),
            "--data_path",
            str(data),
            "--output_path",
            str(out / "run"),
            "--pretrained_model_path",
            str(base),
            "--max_train_steps",
            str(args.max_train_steps),
        ]
    )
    config = resolve_train_config(opts).config
    if not base.exists():
        save_model(build_model_from_config(config), base, config=config)
    summary = run_training(opts, config)
    print("\ndemo finished")
    print(f"  training data : {data}")
    print(f"  base model    : {base}")
    for key in ("weights", "metrics", "loss_plot"):
        print(f"  {key:<14}: {summary[key]}")
    print(f"  steps {summary['steps']}, last loss {summary['last_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
