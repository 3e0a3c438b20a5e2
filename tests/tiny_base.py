"""Shared by tests that train: the tiny SD2-shaped model saved once as the base weights of their runs."""

from pathlib import Path

from ldm.env import set_seed
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.util import CONFIG_DIR, load_config


def save_tiny_base(folder: Path) -> Path:
    """``folder/base.safetensors``: the tiny SD2 with seed-0 random weights and its config embedded."""
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    save_model(build_model_from_config(config), folder / "base.safetensors", config=config)
    return folder / "base.safetensors"
