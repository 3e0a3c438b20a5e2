"""Trainer feedback files: the adapter header and the validation grid (no training loop needed)."""

from __future__ import annotations

import json

from PIL import Image

from ldm.io.checkpoint import read_metadata, read_state_dict
from ldm.train.trainer import TrainOptions, _validation_images, build_trainable_model, save_weights
from ldm.util import CONFIG_DIR, load_config


def test_adapter_file_holds_only_lora_and_header(tmp_path):
    opts = TrainOptions(use_lora=True, lora_rank=2, lora_alpha=4.0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    model, params = build_trainable_model(opts, config)
    assert params and all(".lora_" in p.name for p in params)
    assert sum(p.requires_grad for p in model.get_parameters()) == len(params)
    path = tmp_path / "lora.safetensors"
    save_weights(model, params, path, opts)
    state = read_state_dict(path)
    assert {k for k in state if not k.endswith(".alpha")} == {p.name for p in params}
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {4.0}
    header = json.loads(read_metadata(path)["ldm_lora"])
    assert header["family"] == "sd2" and header["rank"] == 2 and header["alpha"] == 4.0
    assert header["parameterization"] == "eps" and header["context_dim"] == 32

    full = TrainOptions(use_lora=False)
    model, params = build_trainable_model(full, config)
    assert params and all(p.name.startswith("model.diffusion_model.") for p in params)


def test_validation_grid(tmp_path):
    """One grid per validation step (the loss plot is tested with ldm.train.plot in test_tiny_model.py)."""
    model, _ = build_trainable_model(TrainOptions(), load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml"))
    _validation_images(model, ["a red circle", "a blue square"], 7, tmp_path / "val", seed=0, image_size=32)
    grid = Image.open(tmp_path / "val" / "step-000007.png")
    assert grid.size == (64, 32)
