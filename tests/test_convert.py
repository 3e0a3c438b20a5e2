"""Checkpoint conversion: diffusers folder <-> ours, Stability single files, the CLI and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ldm.io.checkpoint import CheckpointError, read_state_dict, write_state_dict
from ldm.io.diffusers_format import config_from_diffusers, read_diffusers_folder, write_diffusers_folder
from ldm.io.loading import cell_state_dict
from ldm.io.model_io import load_pretrained, read_any
from ldm.models.diffusion import build_model_from_config
from ldm.util import load_config

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from tiny_diffusers import save_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _params(node):
    return node["model"]["params"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"diffusers_{request.param}")
    save_folder(path, family=request.param)
    return request.param, path


def test_config_from_diffusers_matches_tiny_yaml(tiny_folder):
    family, folder = tiny_folder
    derived = config_from_diffusers(folder)
    bundled = yaml.safe_load((ROOT / f"ldm/configs/tiny/{family}-tiny.yaml").read_text())
    for part in ("unet_config", "first_stage_config", "cond_stage_config"):
        assert derived["model"]["params"][part]["target"] == bundled["model"]["params"][part]["target"]
        ours = bundled["model"]["params"][part]["params"]
        got = derived["model"]["params"][part]["params"]
        for key, value in ours.items():
            if key in ("use_spatial_transformer",):
                continue
            assert got.get(key, value) == value, (part, key)


def test_diffusers_folder_roundtrip_is_bitwise(tiny_folder, tmp_path):
    """ours -> diffusers folder -> ours gives back every array bit for bit."""
    _, folder = tiny_folder
    state, config = read_diffusers_folder(folder)
    model = build_model_from_config(config)
    load_pretrained(model, folder)
    ours = cell_state_dict(model)
    out = write_diffusers_folder(ours, config, tmp_path / "export")
    again, _ = read_diffusers_folder(out)
    assert again.keys() == ours.keys()
    for key, value in ours.items():
        assert again[key].dtype == value.dtype and np.array_equal(again[key], value), key
    # and the exported weights are diffusers' original arrays
    orig = read_state_dict(folder / "unet" / "diffusion_pytorch_model.safetensors")
    exported = read_state_dict(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert orig.keys() == exported.keys()
    assert all(np.array_equal(orig[k], exported[k]) for k in orig)


def test_exported_folder_loads_in_diffusers(tiny_folder, tmp_path):
    """The exported folder is a working diffusers UNet/VAE/text encoder with the same outputs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _, folder = tiny_folder
    state, config = read_diffusers_folder(folder)
    out = write_diffusers_folder(state, config, tmp_path / "export")
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        a = cls.from_pretrained(folder / sub).eval()
        b = cls.from_pretrained(out / sub).eval()
        for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
            assert ka == kb and torch.equal(va, vb), ka


def test_cli_converts_both_ways(tiny_folder, tmp_path):
    family, folder = tiny_folder
    single = tmp_path / "model.safetensors"
    run = _cli(str(folder), str(single))
    assert run.returncode == 0, run.stderr
    back = tmp_path / "back"
    run = _cli(str(single), str(back))  # config embedded in our file
    assert run.returncode == 0, run.stderr
    a, _ = read_diffusers_folder(folder)
    b, _ = read_diffusers_folder(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_stability_style_file_with_schedule_buffers(tmp_path):
    """A Stability single file carries DDPM buffers and (SD2) unused OpenCLIP keys; they are checked and dropped."""
    from ldm.schedule import alphas_cumprod, make_betas

    config = load_config(ROOT / "ldm/configs/tiny/sd2-tiny.yaml")
    model = build_model_from_config(config)
    state = cell_state_dict(model)
    state["alphas_cumprod"] = alphas_cumprod(make_betas()).astype(np.float32)
    state["betas"] = make_betas().astype(np.float32)
    state["cond_stage_model.model.text_projection"] = np.zeros((32, 32), np.float32)
    state["cond_stage_model.model.logit_scale"] = np.zeros((), np.float32)
    for name in ("ln_1.weight", "attn.in_proj_weight"):
        state[f"cond_stage_model.model.transformer.resblocks.2.{name}"] = np.zeros(1, np.float32)
    path = tmp_path / "stability.safetensors"
    write_state_dict(path, state)
    got = read_any(path, model)
    assert set(got) == set(cell_state_dict(model))

    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.5
    write_state_dict(path, state)
    with pytest.raises(CheckpointError, match="'alphas_cumprod' differs"):
        read_any(path, model)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ldm.convert", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def _one_line_error(run, *needles):
    assert run.returncode != 0
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    config = load_config(ROOT / "ldm/configs/tiny/sd2-tiny.yaml")
    write_state_dict(path, cell_state_dict(build_model_from_config(config)))
    return path


TINY = str(ROOT / "ldm/configs/tiny/sd2-tiny.yaml")


def test_cli_truncated_file(tiny_single, tmp_path):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(tiny_single.read_bytes()[:-1000])
    run = _cli(str(bad), str(tmp_path / "out.safetensors"), "--config", TINY)
    _one_line_error(run, "trunc.safetensors", "truncated")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_wrong_shape_and_missing_key(tiny_single, tmp_path):
    state = read_state_dict(tiny_single)
    key = "model.diffusion_model.out.2.weight"
    state[key] = np.zeros((1, 2, 3, 3), np.float32)
    write_state_dict(tmp_path / "shape.safetensors", state)
    run = _cli(str(tmp_path / "shape.safetensors"), str(tmp_path / "o1.safetensors"), "--config", TINY)
    _one_line_error(run, "shape.safetensors", key)
    del state[key]
    write_state_dict(tmp_path / "missing.safetensors", state)
    run = _cli(str(tmp_path / "missing.safetensors"), str(tmp_path / "o2.safetensors"), "--config", TINY)
    _one_line_error(run, "missing.safetensors", "missing", key)
    assert not list(tmp_path.glob("o*.safetensors"))


def test_cli_refuses_pickle_without_flag(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}}, path)
    run = _cli(str(path), str(tmp_path / "o.safetensors"), "--config", TINY)
    _one_line_error(run, "model.ckpt", "--allow_pickle")


def test_cli_unknown_config_key(tiny_single, tmp_path):
    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["model"]["params"]["unet_config"]["params"]["num_res_blokcs"] = 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    run = _cli(str(tiny_single), str(tmp_path / "o.safetensors"), "--config", str(bad))
    _one_line_error(run, "num_res_blokcs")


def test_cli_does_not_overwrite(tiny_single, tmp_path):
    dst = tmp_path / "exists.safetensors"
    dst.write_text("keep me")
    run = _cli(str(tiny_single), str(dst), "--config", TINY)
    _one_line_error(run, "already exists")
    assert dst.read_text() == "keep me"


@pytest.mark.parametrize(
    "version, unet_cfg",
    [
        (
            "2.1",
            dict(
                block_out_channels=[320, 640, 1280, 1280],
                attention_head_dim=[5, 10, 20, 20],
                cross_attention_dim=1024,
                use_linear_projection=True,
            ),
        ),
        ("1.5", dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768)),
    ],
)
def test_published_diffusers_configs_map_to_bundled_yaml(tmp_path, version, unet_cfg):
    """The configs of the published SD1.5 / SD2-base diffusers repos translate to our bundled YAML exactly."""
    from ldm.util import config_for_version

    blocks = {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }
    sd2 = version.startswith("2")
    files = {
        "unet/config.json": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            **blocks,
            **unet_cfg,
        },
        "vae/config.json": {
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 256 if not sd2 else 768,
        },
        "text_encoder/config.json": {
            "hidden_size": 1024 if sd2 else 768,
            "intermediate_size": 4096 if sd2 else 3072,
            "num_hidden_layers": 23 if sd2 else 12,
            "num_attention_heads": 16 if sd2 else 12,
            "hidden_act": "gelu" if sd2 else "quick_gelu",
            "max_position_embeddings": 77,
        },
        "scheduler/scheduler_config.json": {"prediction_type": "epsilon", "beta_schedule": "scaled_linear"},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    derived = _params(config_from_diffusers(tmp_path))
    bundled = _params(yaml.safe_load(config_for_version(version).read_text()))
    for part in ("unet_config", "cond_stage_config"):
        assert derived[part]["target"] == bundled[part]["target"]
        for key, value in bundled[part]["params"].items():
            assert derived[part]["params"][key] == value, (part, key)
    dd = bundled["first_stage_config"]["params"]["ddconfig"]
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels"):
        assert derived["first_stage_config"]["params"]["ddconfig"][key] == dd[key]
