"""Generation options (``ldm.generate_options``): every option is a flag and a ``--config_file`` key meaning the
same, the command line wins over the file, a bad file or value is one error naming it, and all of that is decided
before MindSpore is imported."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm.generate_options import GenerateOptions, GenerationError, parse_options
from ldm.options import cli_fields
from ldm.util import CONFIG_DIR, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/text_to_image.py"
TINY_CONFIG = "tiny/sd2-tiny.yaml"

# A value other than the default for every option (the prompt source is tested on its own).
NON_DEFAULT = {
    "prompt": "a red fox",
    "negative_prompt": "blurry",
    "config": TINY_CONFIG,
    "version": "1.5",
    "ckpt_path": "weights.safetensors",
    "allow_pickle": True,
    "sampler": "ddim",
    "sampling_steps": 7,
    "use_karras_sigmas": True,
    "algorithm_type": "sde-dpmsolver++",
    "scale": 3.5,
    "ddim_eta": 0.5,
    "clip_skip": 1,
    "init_image": "init.png",
    "strength": 0.5,
    "prompt_weighting": True,
    "n_samples": 3,
    "n_iter": 4,
    "H": 64,
    "W": 96,
    "seed": 7,
    "seed_per_prompt": True,
    "use_lora": True,
    "lora_ckpt_path": ["a.safetensors", "b.safetensors"],
    "lora_scale": [0.5, 0.25],
    "lora_ft_text_encoder": True,
    "output_path": "out/run1",
    "device_target": "GPU",
    "mode": 1,
    "max_memory_gib": 6.5,
    "attention_slice_size": 2,
    "vae_slicing": True,
    "vae_tile_latent_size": 16,
    "precision": "fp16",
    "use_fp16": True,
    "vae_precision": "bf16",
    "text_encoder_precision": "fp16",
    "enable_flash_attention": True,
    "compile_cache": False,
}


def _flags(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        argv.append(f"--{key}")
        argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return argv


def test_every_option_is_covered():
    assert sorted(NON_DEFAULT) == sorted(f.name for f in cli_fields(GenerateOptions) if f.name != "data_path")
    defaults = GenerateOptions()
    for key, value in NON_DEFAULT.items():
        assert getattr(defaults, key) != value, key


def test_config_file_round_trip_equals_flags(tmp_path):
    """A YAML holding every option parses to the same options as the same values given as flags."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(NON_DEFAULT), encoding="utf-8")
    from_file = parse_options(["--config_file", str(path)])
    from_flags = parse_options(_flags(NON_DEFAULT))
    file_values, flag_values = dataclasses.asdict(from_file), dataclasses.asdict(from_flags)
    # The file's model config is found next to the file, then in configs/: the same file as the flag's.
    assert Path(file_values.pop("config")).resolve() == (CONFIG_DIR / TINY_CONFIG).resolve()
    flag_values.pop("config")
    assert file_values == flag_values
    assert from_file.prompts == ["a red fox"] and from_file.adapters() == NON_DEFAULT["lora_ckpt_path"]
    for key, value in NON_DEFAULT.items():
        if key != "config":
            assert getattr(from_file, key) == value, key


def test_unknown_key_is_refused_naming_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("prompt: a fox\nsampling_stpes: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown option 'sampling_stpes' \(valid: .*sampling_steps"):
        parse_options(["--config_file", str(path)])
    path.write_text("prompt: a fox\nsampler: euler_x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml: option 'sampler' is 'euler_x'; choose from ddim"):
        parse_options(["--config_file", str(path)])
    path.write_text("prompt: a fox\nn_iter: two\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml: option 'n_iter' has a wrong value 'two'"):
        parse_options(["--config_file", str(path)])


def test_command_line_overrides_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"prompt": "a fox", "seed": 1, "sampling_steps": 5, "lora_ckpt_path": ["a.safetensors"], "use_lora": True}
        ),
        encoding="utf-8",
    )
    opts = parse_options(["--config_file", str(path), "--seed", "9", "--lora_ckpt_path", "b.safetensors"])
    assert (opts.seed, opts.sampling_steps, opts.prompts) == (9, 5, ["a fox"])
    assert opts.lora_ckpt_path == ["b.safetensors"]  # the command line's list replaces the file's
    opts = parse_options(["--config_file", str(path), "--lora_ckpt_path", "b", "--lora_ckpt_path", "c"])
    assert opts.lora_ckpt_path == ["b", "c"]  # the flag repeated adds items, as before the schema
    opts = parse_options(["--config_file", str(path), "--data_path", str(prompts)])
    assert (opts.prompt, opts.prompts) == ("", ["a cat", "a dog"])  # --data_path replaces the file's prompt
    with pytest.raises(GenerationError, match="exactly one of --prompt and --data_path"):
        parse_options(["--prompt", "x", "--data_path", str(prompts)])
    with pytest.raises(GenerationError, match="exactly one of --prompt and --data_path"):
        parse_options([])


def test_bool_flags_take_a_value_or_none():
    assert parse_options(["--prompt", "x", "--allow_pickle"]).allow_pickle is True
    assert parse_options(["--prompt", "x", "--allow_pickle", "False"]).allow_pickle is False
    assert parse_options(["--prompt", "x", "--vae-slicing", "true"]).vae_slicing is True


# Each bad input fails in the parser or validate_job, before MindSpore starts.
PROBE = """
import runpy, sys
sys.argv = [{script!r}, *{argv!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    print("STATUS", exc.code)
print("MINDSPORE", "mindspore" in sys.modules)
"""


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "x", "--sampler", "euler_x"], "invalid choice: 'euler_x'"),
        (["--prompt", "x", "--use_fp16", "True", "--precision", "bf16"], "--use_fp16 True conflicts"),
        (["--prompt", "x", "--H", "100"], "--H 100 must be a positive multiple of 8"),
        (["--prompt", "x", "--ckpt_path", "missing.safetensors"], "missing.safetensors: checkpoint not found"),
        (["--config_file", "{tmp}/bad.yaml"], "bad.yaml: unknown option 'sampling_stpes'"),
        (["--config_file", "{tmp}/missing.yaml"], "missing.yaml"),
        (["--prompt", "x", "--sampler", "euler_a", "--use_karras_sigmas"], "--use_karras_sigmas does not apply to"),
        (["--prompt", "x", "--sampler", "ddim", "--use_karras_sigmas", "True"], "--sampler ddim (Karras sigmas are"),
        (["--prompt", "x", "--sampler", "euler", "--algorithm_type", "sde-dpmsolver++"], "dpm_solver_pp only"),
    ],
)
def test_errors_before_mindspore_import(tmp_path, argv, needle):
    (tmp_path / "bad.yaml").write_text("prompt: a fox\nsampling_stpes: 10\n", encoding="utf-8")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--output_path", str(tmp_path / "out")]
    code = PROBE.format(script=str(SCRIPT), argv=argv)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], run.stderr[-2000:]
    assert "STATUS 2" in run.stdout and "MINDSPORE False" in run.stdout, run.stdout + run.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_shipped_config_file_parses():
    opts = parse_options(["--config_file", str(ROOT / "configs/generate/tiny_sd_euler_a.yaml")])
    assert (opts.sampler, opts.ckpt_path, opts.seed) == ("euler_a", "models/tiny_sd/tiny_sd.safetensors", 7)
    assert (ROOT / opts.ckpt_path).is_file()


def test_help_lists_samplers_and_config_file():
    run = subprocess.run([sys.executable, str(SCRIPT), "-h"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    from ldm.names import SAMPLER_NAMES

    assert "{" + ",".join(SAMPLER_NAMES) + "}" in text
    assert "--config_file" in text and "--use_karras_sigmas" in text and "sde-dpmsolver++" in text
