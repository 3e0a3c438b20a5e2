"""Reliability: the diffusers-folder converter refuses every setting our networks do not implement (allow-list), real
SD folders still convert, and the SD2 "!" tokenisation difference is stated on export and import."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import ldm  # noqa: F401  (must precede mindspore)
from ldm.io.checkpoint import CheckpointError
from ldm.io.diffusers_format import SD2_EXCLAMATION_NOTE, config_from_diffusers
from ldm.tokenizer import CLIPTokenizer

DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
# The config.json files of the published stabilityai/stable-diffusion-2-1 folder (keys and values as released).
SD21 = {
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": DOWN,
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 96,
        "up_block_types": UP,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 768,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder/config.json": {
        "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "pad_token_id": 1,
        "projection_dim": 512,
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
        "vocab_size": 49408,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
}


def _write(folder: Path, files: dict) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder


def test_published_sd21_folder_config_converts(tmp_path):
    """The released SD2.1 config.json files pass the allow-list and give the 768 v-model."""
    params = config_from_diffusers(_write(tmp_path, SD21))["model"]["params"]
    assert params["parameterization"] == "v" and params["image_size"] == 96
    assert params["cond_stage_config"]["params"]["layers"] == 23


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_folder_saved_by_installed_diffusers_converts(tmp_path, family):
    """Every key the installed diffusers/transformers write with save_pretrained is understood."""
    pytest.importorskip("diffusers")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_diffusers import save_folder

    save_folder(tmp_path, family=family)
    config = config_from_diffusers(tmp_path)
    assert config["model"]["params"]["cond_stage_config"]["target"].endswith(
        "FrozenCLIPEmbedder" if family == "sd1" else "FrozenOpenCLIPEmbedder"
    )


REFUSED = [
    ("unet/config.json", "timestep_post_act", "silu"),
    ("unet/config.json", "time_embedding_act_fn", "silu"),
    ("unet/config.json", "norm_eps", 1e-6),
    ("unet/config.json", "resnet_out_scale_factor", 2.0),
    ("unet/config.json", "resnet_skip_time_act", True),
    ("unet/config.json", "cross_attention_norm", "group_norm"),
    ("unet/config.json", "attention_type", "gated"),
    ("unet/config.json", "downsample_padding", 0),
    ("unet/config.json", "mid_block_scale_factor", 2),
    ("unet/config.json", "only_cross_attention", [True, False, False, False]),
    ("unet/config.json", "some_future_option", 1),
    ("text_encoder/config.json", "layer_norm_eps", 1e-6),
    ("text_encoder/config.json", "hidden_act", "gelu_new"),
    ("text_encoder/config.json", "model_type", "clip_vision_model"),
    ("text_encoder/config.json", "rope_theta", 10000.0),
    ("vae/config.json", "shift_factor", 0.1159),
    ("vae/config.json", "use_quant_conv", False),
    ("vae/config.json", "mid_block_add_attention", False),
    ("vae/config.json", "latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ("scheduler/scheduler_config.json", "rescale_betas_zero_snr", True),
    ("scheduler/scheduler_config.json", "trained_betas", [0.1] * 1000),
    ("scheduler/scheduler_config.json", "beta_schedule", "squaredcos_cap_v2"),
]


@pytest.mark.parametrize("file, key, value", REFUSED, ids=[f"{f.split('/')[0]}.{k}" for f, k, _ in REFUSED])
def test_unimplemented_setting_is_refused_by_name(tmp_path, file, key, value):
    """Defect 7: a config key/value our network does not implement is refused naming the file and the key."""
    files = copy.deepcopy(SD21)
    files[file][key] = value
    with pytest.raises(CheckpointError) as err:
        config_from_diffusers(_write(tmp_path, files))
    message = str(err.value)
    assert message.startswith(str(tmp_path / file)) and repr(key)[1:-1] in message, message


def test_up_blocks_must_mirror_down_blocks(tmp_path):
    """An up path that is not the mirror of the down path (another UNet layout) is refused."""
    files = copy.deepcopy(SD21)
    files["unet/config.json"]["up_block_types"] = ["CrossAttnUpBlock2D"] * 4
    with pytest.raises(CheckpointError, match="up_block_types .* must mirror down_block_types"):
        config_from_diffusers(_write(tmp_path, files))


def test_sampling_only_scheduler_settings_are_accepted(tmp_path):
    """Scheduler settings that only matter for sampling (any scheduler class) do not block a conversion."""
    files = copy.deepcopy(SD21)
    files["scheduler/scheduler_config.json"].update(
        {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "use_karras_sigmas": True}
    )
    assert config_from_diffusers(_write(tmp_path, files))["model"]["params"]["parameterization"] == "v"


def test_sd2_exclamation_mark_is_open_clip_tokenisation():
    """Defect 8: "!" after a word is the single token "!</w>" (256) for SD2, as open_clip, not the pad id 0."""
    tok = CLIPTokenizer.for_family("sd2")
    ids = tok(["wow!!"])[0]
    assert list(ids[:4]) == [49406, tok.encoder["wow</w>"], tok.encoder["!!</w>"], 49407]
    assert list(tok(["hi !"])[0][:4]) == [49406, tok.encoder["hi</w>"], 256, 49407]
    assert np.all(tok(["hi"])[0][3:] == 0)  # and padding is id 0 ("!")


def test_sd2_exclamation_mark_transformers_differs_and_round_trip_says_so(tmp_path):
    """Defect 8: transformers reads "!" in a prompt as the pad id 0 with the SD2 tokenizer folder; the diffusers
    export and import of an SD2 model warn about it (the note is checked against the installed transformers)."""
    transformers = pytest.importorskip("transformers")
    from ldm.io.diffusers_format import _write_tokenizer, read_diffusers_folder

    _write_tokenizer(tmp_path / "tokenizer", "sd2", 77)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ours = CLIPTokenizer.for_family("sd2")
    theirs = reference("hi !", padding="max_length", max_length=77).input_ids
    assert theirs[:4] == [49406, ours.encoder["hi</w>"], 0, 49407]  # the difference the note describes
    assert list(ours(["hi !"])[0][:4]) != theirs[:4]

    folder = _write(tmp_path / "sd2", SD21)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError):  # no weights in this folder: the note comes before reading them
            read_diffusers_folder(folder)
    assert any(SD2_EXCLAMATION_NOTE in str(w.message) for w in caught)


def test_sd2_export_warns_about_exclamation_mark(tmp_path):
    """Defect 8: writing an SD2 model as a diffusers folder states the "!" difference; SD1 does not."""
    from ldm.io.diffusers_format import write_diffusers_folder
    from ldm.io.loading import cell_state_dict
    from ldm.models.diffusion import build_model_from_config
    from ldm.util import CONFIG_DIR, load_config

    for family, expected in (("sd2", True), ("sd1", False)):
        config = load_config(CONFIG_DIR / f"tiny/{family}-tiny.yaml")
        state = cell_state_dict(build_model_from_config(config))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write_diffusers_folder(state, config, tmp_path / family)
        assert any(SD2_EXCLAMATION_NOTE in str(w.message) for w in caught) == expected, family
