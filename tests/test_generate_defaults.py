"""Generation defaults come from the resolved model config, whatever its source (--config, --version, a config
embedded in the checkpoint): image size = latent image_size x VAE factor, guidance by family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.generate import default_settings, resolve_config
from ldm.generate_options import GenerateOptions
from ldm.io.model_io import save_model
from ldm.models.diffusion import build_model_from_config
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "config, expected",
    [
        ("v1-inference.yaml", (512, 512, 7.5)),
        ("v2-inference.yaml", (512, 512, 9.0)),
        ("v2-inference-v.yaml", (768, 768, 9.0)),
        ("tiny/sd1-tiny.yaml", (32, 32, 7.5)),
        ("tiny/sd2-tiny.yaml", (32, 32, 9.0)),
    ],
)
def test_defaults_of_each_config(config, expected):
    assert default_settings(load_config(CONFIG_DIR / config)) == expected


def test_cli_takes_size_and_guidance_from_the_embedded_config(tmp_path):
    """An SD1 tiny checkpoint with its config embedded, no --config/--version/--H/--W/--scale: 32 px (not 512, which
    runs a 16x16 model at 64x64 latents) and guidance 7.5 (not SD2's 9.0)."""
    config = load_config(CONFIG_DIR / "tiny/sd1-tiny.yaml")
    weights = tmp_path / "sd1-tiny.safetensors"
    save_model(build_model_from_config(config), weights, config=config)
    job = GenerateOptions(prompts=["a fox"], ckpt_path=str(weights))
    assert resolve_config(job).label == f"{weights} (embedded config)"

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples/stable_diffusion_v2/text_to_image.py"), "--prompt", "a fox"]
    cmd += ["--ckpt_path", str(weights), "--sampling_steps", "1", "--n_iter", "1", "--mode", "1"]
    run = subprocess.run([*cmd, "--output_path", str(out)], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((out / "samples" / "00000.json").read_text())
    assert (meta["H"], meta["W"], meta["scale"]) == (32, 32, 7.5)
