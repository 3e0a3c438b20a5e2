"""Where training takes its model config and adapters from: a diffusers folder given as the pretrained model, and an
SD2 adapter that went out to a diffusers file and came back, resumed from a train state that holds it.

Runs are tiny (SD2-shaped test model, 32 px, 1-3 steps, PyNative mode to skip graph compilation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm.data.synthetic import make_shapes_dataset
from ldm.env import set_seed
from ldm.io.checkpoint import read_metadata, read_state_dict
from ldm.io.model_io import save_model
from ldm.lora.cli import main as lora_main
from ldm.models.diffusion import build_model_from_config
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY_TRAIN = ROOT / "configs/train/train_config_lora_tiny.yaml"
TINY_MODEL = CONFIG_DIR / "tiny/sd2-tiny.yaml"


def train(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--mode", "1", "--train_batch_size", "2", "--image_size", "32", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("sources") / "data", count=4, size=32)


def test_pretrained_diffusers_folder_gives_the_model_config(tmp_path, data):
    """The SD2 recipe names ldm/configs/v2-inference.yaml (full size); with a tiny diffusers folder as the pretrained
    model the folder's config.json files decide, so the tiny weights load strictly and training runs."""
    pytest.importorskip("diffusers")
    from tests.tiny_diffusers import save_folder

    folder = tmp_path / "pipe"
    save_folder(folder, family="sd2")
    out = tmp_path / "out"
    run = train(
        "--train_config",
        ROOT / "configs/train/train_config_lora_v2.yaml",
        "--pretrained_model_path",
        folder,
        "--data_path",
        data,
        "--output_path",
        out,
        "--max_train_steps",
        "1",
        "--use_ema",
        "False",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"model config: {folder} (diffusers config)" in run.stderr
    header = json.loads(read_metadata(out / "ckpt" / "lora-000001.safetensors")["ldm_lora"])
    assert header["family"] == "sd2" and header["context_dim"] == 32  # the tiny folder's, not v2-inference's 1024


def test_imported_sd2_adapter_resumes_from_the_train_state_holding_it(tmp_path, data):
    """Train UNet + text-encoder LoRA (SD2: fused OpenCLIP in_proj), send the adapter out as a diffusers file and
    import it back: it comes back under the trainer's own parameter names and shapes, equal to the LoRA parameters the
    train state holds, so ``--resume`` continues from that state with no renaming."""
    set_seed(0)
    config = load_config(TINY_MODEL)
    base = tmp_path / "base.safetensors"
    save_model(build_model_from_config(config), base, config=config)
    out = tmp_path / "out"
    common = ["--train_config", TINY_TRAIN, "--pretrained_model_path", base, "--data_path", data]
    common += ["--output_path", out, "--lora_ft_text_encoder", "True", "--ckpt_save_interval", "0"]
    first = train(*common, "--max_train_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]

    adapter = out / "ckpt" / "lora-000002.safetensors"
    shared, imported = tmp_path / "diffusers_lora.safetensors", tmp_path / "imported.safetensors"
    assert lora_main(["export", str(adapter), str(shared), "--format", "diffusers", "--config", str(TINY_MODEL)]) == 0
    assert set(read_state_dict(shared)) and all(
        k.startswith(("unet.", "text_encoder.")) for k in read_state_dict(shared)
    )
    assert lora_main(["import", str(shared), str(imported), "--config", str(TINY_MODEL)]) == 0

    back = {k: v for k, v in read_state_dict(imported).items() if not k.endswith(".alpha")}
    state = read_state_dict(out / "ckpt" / "train_state.safetensors")
    fused = [k for k in back if ".attn.in_proj_lora." in k]
    assert fused, "the SD2 text-encoder adapter has fused in_proj modules"
    assert set(back) <= set(state)
    params = {k for k in state if k.startswith(("model.diffusion_model.", "cond_stage_model."))}  # not moments
    assert params == set(back)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)

    resumed = train(*common, "--max_train_steps", "3", "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = read_state_dict(out / "ckpt" / "lora-000003.safetensors")
    assert {k for k in final if not k.endswith(".alpha")} == set(back)
    assert any(not np.array_equal(final[k], back[k]) for k in fused)  # the resumed step trained the fused modules
