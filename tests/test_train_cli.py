"""Training CLI: option precedence and bad input (one clear line, exit != 0, no output files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ldm.data.synthetic import make_shapes_dataset
from ldm.train.options import parse_options
from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY = ROOT / "configs/train/train_config_lora_tiny.yaml"


def test_precedence_cli_over_yaml_over_defaults():
    opts = parse_options(["--train_config", str(TINY), "--lora_rank", "8"])
    assert opts.lora_rank == 8  # CLI
    assert opts.image_size == 32  # YAML
    assert opts.weight_decay == 1e-2  # default


def test_unknown_and_mistyped_yaml_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnak: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'lora_rnak' \(valid: .*lora_rank"):
        parse_options(["--train_config", str(bad)])
    bad.write_text("lora_rank: four\n")
    with pytest.raises(ConfigError, match="option 'lora_rank' has a wrong value 'four'"):
        parse_options(["--train_config", str(bad)])
    bad.write_text("use_lora: 3\n")
    with pytest.raises(ConfigError, match="option 'use_lora' has a wrong value 3"):
        parse_options(["--train_config", str(bad)])


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "data_path is required"),
        (["--data_path", "/nonexistent/data"], "/nonexistent/data: no such folder"),
        (["--pretrained_model_path", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, extra, needle):
    data = make_shapes_dataset(tmp_path / "data", count=4, size=32)
    args = ["--train_config", str(TINY), "--output_path", str(tmp_path / "out")]
    if extra[:1] != ["--data_path"] and "data_path is required" not in needle:
        args += ["--data_path", str(data)]
    run = _run(*args, *extra)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_empty_csv_and_corrupt_image(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "img_txt.csv").write_text("dir,text\n")
    run = _run("--train_config", str(TINY), "--data_path", str(data), "--output_path", str(tmp_path / "out"))
    assert run.returncode != 0 and "img_txt.csv" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["lora_v1", "lora_v2", "lora_v2_vpred", "vanilla_v2", "lora_tiny", "locon_v1", "dora_v1"]
)
def test_bundled_train_configs_parse(name):
    opts = parse_options(["--train_config", str(ROOT / f"configs/train/train_config_{name}.yaml")])
    assert (ROOT / opts.model_config).is_file()
    assert opts.use_lora == (name != "vanilla_v2")


def test_bad_choice_fails_before_mindspore(tmp_path):
    """A value outside an option's choices (YAML or command line) is one line naming the source and the option,
    before MindSpore starts or any weights load; ``-h`` needs no MindSpore either."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_targets: everything\n")
    with pytest.raises(ConfigError, match="bad.yaml: option 'lora_targets' is 'everything'; choose from attention"):
        parse_options(["--train_config", str(bad)])
    probe = (
        "import sys, runpy; sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    print('mindspore' in sys.modules, e.code)\n"
    )
    for args, code in ((["--scheduler", "sometimes"], "2"), (["-h"], "0")):
        run = subprocess.run([sys.executable, "-c", probe, str(SCRIPT), *args], capture_output=True, text=True)
        assert run.stdout.strip().splitlines()[-1] == f"False {code}", run.stdout[-500:] + run.stderr[-2000:]
    run = _run("--scheduler", "sometimes")
    assert run.returncode == 2 and run.stderr.count("error:") == 1 and "--scheduler" in run.stderr
