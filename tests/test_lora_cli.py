"""``python -m ldm.lora``: round trips and one-line errors; its deprecated alias ``ldm.lora_tools`` warns."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ldm.io.checkpoint import read_metadata, read_state_dict, write_state_dict
from ldm.lora.adapter import META_KEY, delta_weight, modules, read_adapter, write_adapter
from ldm.lora.cli import main
from ldm.lora.interop import PEFT_METADATA_KEY
from tests.lora_files import assert_same_deltas, random_adapter, te_shapes

CLI_LAYOUT = ["--num-res-blocks", "1", "--channel-mult", "1,2", "--attention-resolutions", "2,1"]


def test_cli_round_trips(tmp_path, rng, capsys):
    adapter = random_adapter("sd2", rng)
    write_adapter(tmp_path / "a.safetensors", adapter)
    assert (
        main(
            [
                "export",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "k.safetensors"),
                "--format",
                "kohya",
                "--config",
                "ldm/configs/tiny/sd2-tiny.yaml",
            ]
        )
        == 0
    )
    assert main(["import", str(tmp_path / "k.safetensors"), str(tmp_path / "b.safetensors"), *CLI_LAYOUT]) == 0
    back = read_adapter(tmp_path / "b.safetensors")  # family from kohya's ss_v2
    assert back.meta["family"] == "sd2"
    assert_same_deltas(adapter, back, rtol=1e-6)
    assert (
        main(
            [
                "export",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "d.safetensors"),
                "--format",
                "diffusers",
                *CLI_LAYOUT,
            ]
        )
        == 0
    )
    assert PEFT_METADATA_KEY in read_metadata(tmp_path / "d.safetensors")
    assert (
        main(
            [
                "import",
                str(tmp_path / "d.safetensors"),
                str(tmp_path / "c.safetensors"),
                "--family",
                "sd2",
                "--parameterization",
                "v",
                *CLI_LAYOUT,
            ]
        )
        == 0
    )
    assert read_adapter(tmp_path / "c.safetensors").meta["parameterization"] == "v"
    assert (
        main(
            [
                "combine",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "c.safetensors"),
                str(tmp_path / "s.safetensors"),
                "--w2",
                "-1",
                "--rank",
                "2",
            ]
        )
        == 0
    )
    assert "relative Frobenius error" in capsys.readouterr().out
    base = {
        (p[: -len(".in_proj_lora")] + ".in_proj_weight" if p.endswith(".in_proj_lora") else p + ".weight"): np.zeros(
            (m.up.shape[0], m.down.shape[1]), np.float32
        )
        for p, m in modules(adapter).items()
    }
    write_state_dict(tmp_path / "base.safetensors", base, {"config": "x"})
    assert (
        main(
            [
                "merge",
                str(tmp_path / "base.safetensors"),
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "m.safetensors"),
                "--weight",
                "2",
            ]
        )
        == 0
    )
    merged = read_state_dict(tmp_path / "m.safetensors")
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v"
    np.testing.assert_allclose(merged[key + ".weight"], 2 * delta_weight(*modules(adapter)[key]), rtol=1e-5)
    assert read_metadata(tmp_path / "m.safetensors")["config"] == "x"


def _one_line_error(capsys, argv, match, out=None):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and match in err, err
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_cli_bad_input(tmp_path, rng, capsys):
    out = tmp_path / "out.safetensors"
    _one_line_error(
        capsys,
        ["export", str(tmp_path / "missing.safetensors"), str(out), "--format", "kohya"],
        "no such checkpoint file",
        out,
    )
    adapter = random_adapter("sd1", rng, shapes=te_shapes("sd1"))
    write_state_dict(tmp_path / "wrong.safetensors", adapter.state, {META_KEY: json.dumps({"family": "sd3"})})
    _one_line_error(
        capsys,
        ["export", str(tmp_path / "wrong.safetensors"), str(out), "--format", "kohya"],
        "family must be one of",
        out,
    )
    write_state_dict(tmp_path / "sd1.safetensors", adapter.state, {META_KEY: json.dumps({"family": "sd1"})})
    _one_line_error(
        capsys,
        [
            "export",
            str(tmp_path / "sd1.safetensors"),
            str(out),
            "--format",
            "diffusers",
            "--config",
            "ldm/configs/tiny/sd2-tiny.yaml",
        ],
        "does not match",
        out,
    )
    write_state_dict(
        tmp_path / "sd2base.safetensors",
        {"cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight": np.zeros((32, 32))},
    )
    _one_line_error(
        capsys,
        ["merge", str(tmp_path / "sd2base.safetensors"), str(tmp_path / "sd1.safetensors"), str(out)],
        "does not match the base model family",
        out,
    )
    write_state_dict(
        tmp_path / "full.safetensors",
        {"model.diffusion_model.out.2.weight": np.zeros((4, 4))},
        {META_KEY: json.dumps({"family": "sd1"})},
    )
    _one_line_error(
        capsys,
        ["combine", str(tmp_path / "full.safetensors"), str(tmp_path / "sd1.safetensors"), str(out)],
        "is not a LoRA key",
        out,
    )
    write_state_dict(
        tmp_path / "k.safetensors",
        {
            "lora_unet_conv_in.lora_down.weight": np.zeros((4, 4)),
            "first_stage_model.encoder.conv_in.weight": np.zeros((4, 4)),
        },
    )
    _one_line_error(
        capsys,
        ["import", str(tmp_path / "k.safetensors"), str(out), "--family", "sd1"],
        "cannot tell the LoRA format",
        out,
    )
    _one_line_error(
        capsys,
        ["import", str(tmp_path / "k.safetensors"), str(out), "--format", "kohya", "--family", "sd1"],
        "is not a kohya LoRA key",
        out,
    )
    _one_line_error(
        capsys, ["import", str(tmp_path / "k.safetensors"), str(out), "--family", "sd3"], "invalid choice", out
    )
    out.write_bytes(b"keep")
    _one_line_error(
        capsys, ["export", str(tmp_path / "sd1.safetensors"), str(out), "--format", "kohya"], "already exists"
    )
    assert out.read_bytes() == b"keep"


def test_cli_entry_point_help_and_error(tmp_path):
    """``python -m ldm.lora``: help for every command, one error line (exit 2) for a missing file, the traceback only
    with --debug; kebab spellings of the flags still work."""
    module = "ldm.lora"
    run = [sys.executable, "-m", module]
    for command in ("export", "import", "merge", "combine"):
        res = subprocess.run([*run, command, "-h"], capture_output=True, text=True, check=True)
        assert "--overwrite" in res.stdout and f"python -m {module} {command}" in res.stdout
    missing = [*run, "merge", "nope.safetensors", "nope2.safetensors", str(tmp_path / "o.safetensors")]
    res = subprocess.run([*missing, "--allow-pickle"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nope" in res.stderr, res.stderr
    res = subprocess.run([*missing, "--debug"], capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("lora_bias", True, "'lora_bias' = true is not supported (the LoRA layers here have no bias"),
        ("some_future_feature", {"on": 1}, "'some_future_feature'"),
        ("r", "4", "field 'r' must be a positive integer"),
        ("alpha_pattern", {"attn1.(": 2}, "is not a regular expression"),
        ("peft_type", "OFT", "peft_type 'OFT' is not supported (only LORA, LOHA, LOKR)"),
    ],
)
def test_peft_folder_bad_config_is_one_line(field, value, expected, tmp_path, rng, capsys):
    from ldm.lora.peft_folder import write_peft_folder
    from tests.lora_files import LAYOUT

    write_peft_folder(tmp_path / "run", random_adapter("sd1", rng), LAYOUT)
    config_file = tmp_path / "run" / "unet" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    out = tmp_path / "o.safetensors"
    assert main(["import", str(tmp_path / "run"), str(out), "--family", "sd1", *CLI_LAYOUT]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert str(config_file) in err and not out.exists()


def test_peft_export_needs_a_folder_name(tmp_path, rng, capsys):
    write_adapter(tmp_path / "a.safetensors", random_adapter("sd2", rng))
    argv = ["export", str(tmp_path / "a.safetensors"), str(tmp_path / "p.safetensors"), "--format", "peft"]
    assert main([*argv, *CLI_LAYOUT]) == 2
    assert "is a folder" in capsys.readouterr().err and not (tmp_path / "p.safetensors").exists()
    assert main([*argv[:2], str(tmp_path / "p"), "--format", "peft", "--fold_scale", *CLI_LAYOUT]) == 2
    assert "--fold_scale applies to --format diffusers only" in capsys.readouterr().err


def test_lora_tools_alias_warns_naming_the_release_that_removes_it():
    """``python -m ldm.lora_tools`` still works, with a DeprecationWarning shown by default; importing it warns too."""
    run = subprocess.run([sys.executable, "-m", "ldm.lora_tools", "-h"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "export" in run.stdout, run.stderr[-2000:]
    assert "DeprecationWarning: ldm.lora_tools is deprecated and will be removed in ldm 0.2.0" in run.stderr
    assert "python -m ldm.lora" in run.stderr
    sys.modules.pop("ldm.lora_tools", None)
    with pytest.warns(DeprecationWarning, match=r"removed in ldm 0\.2\.0"):
        import ldm.lora_tools  # noqa: F401
