"""Reliability: every CLI with bad input answers with exactly one ``error:`` line naming the culprit, exit status 2, no
traceback and no output written. Each case calls the CLI's ``main`` in-process (what ``python script.py`` runs);
one case per CLI also runs as a real subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import ldm  # noqa: F401  (must precede mindspore)
from ldm import convert
from ldm.data.synthetic import make_shapes_dataset
from ldm.env import set_seed
from ldm.io.model_io import save_model
from ldm.lora.cli import main as lora_main
from ldm.models.diffusion import build_model_from_config
from ldm.train.trainer import TrainOptions, build_trainable_model, save_weights
from ldm.util import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "convert": None,
    "lora": None,
    "text_to_image": ROOT / "examples/stable_diffusion_v2/text_to_image.py",
    "train": ROOT / "examples/stable_diffusion_v2/train_text_to_image.py",
    "eval_fid": ROOT / "tools/eval/eval_fid.py",
    "eval_clip_score": ROOT / "tools/eval/eval_clip_score.py",
}
TINY_TRAIN = ROOT / "configs/train/train_config_lora_tiny.yaml"
LATIN1 = "caf\u00e9".encode("latin-1")


def _main(cli: str):
    if cli == "convert":
        return convert.main
    if cli == "lora":
        return lora_main
    spec = importlib.util.spec_from_file_location(f"rel_cli_{cli}", SCRIPTS[cli])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model file, an adapter-shaped file, a small image set, prompt files of every bad kind."""
    root = tmp_path_factory.mktemp("rel_cli")
    set_seed(0)
    config = load_config(CONFIG_DIR / "tiny/sd2-tiny.yaml")
    save_model(build_model_from_config(config), root / "tiny.safetensors", config=config)
    (root / "a_file").write_text("not a folder")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(images / f"{i}.png")
    (root / "empty_images").mkdir()
    (root / "empty.txt").write_text("\n  \n\n")
    (root / "latin1.txt").write_bytes(b"a fox\n" + LATIN1 + b"\n")
    (root / "blank_middle.txt").write_text("a fox\n\nan owl\n")
    data = make_shapes_dataset(root / "data", count=2, size=32)
    opts = TrainOptions(use_lora=True, lora_rank=2)
    model, params = build_trainable_model(opts, config)
    save_weights(model, params, root / "adapter.safetensors", opts)
    latin = root / "latin_data"
    latin.mkdir()
    Image.new("RGB", (32, 32)).save(latin / "a.png")
    (latin / "img_txt.csv").write_bytes(b"dir,text\na.png,ok\na.png," + LATIN1 + b"\n")
    blank = root / "blank_data"
    blank.mkdir()
    (blank / "img_txt.csv").write_text("dir,text\n\n\n")
    for folder, size, caption in (("kohya_name/sks", (32, 32), "x"), ("kohya_nocap/2_sks", (32, 32), None),
                                  ("kohya_small/1_sks", (12, 40), "x")):  # fmt: skip
        (root / folder).mkdir(parents=True)
        Image.new("RGB", size, (90, 20, 20)).save(root / folder / "a.png")
        if caption:
            (root / folder / "a.txt").write_text(caption)
    (root / "bad_config.toml").write_text(
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{root / "kohya_small/1_sks"}"\nflip_aug = true\n'
    )
    return {"root": root, "data": data, "adapter": root / "adapter.safetensors"}


def _cases():
    """(id, cli, argv template, text the error line must contain); {r} is the fixture folder."""
    train = ["--train_config", str(TINY_TRAIN)]
    t2i = ["--version", "2.1", "--output_path", "{r}/t2i_out"]
    clip = ["--model_dir", "{r}/no_clip"]
    return [
        ("convert-missing-src", "convert", ["{r}/missing.safetensors", "{r}/out.safetensors"], "missing.safetensors"),
        ("convert-existing-dst", "convert", ["{r}/tiny.safetensors", "{r}/tiny.safetensors"], "already exists"),
        ("convert-dst-under-file", "convert", ["{r}/tiny.safetensors", "{r}/a_file/out.safetensors"], "a_file"),
        ("convert-no-config", "convert", ["{r}/latin1.txt", "{r}/out.safetensors"], "latin1.txt"),
        ("lora-export-missing", "lora", ["export", "{r}/missing.safetensors", "{r}/o.safetensors", "--format",
                                               "kohya"], "missing.safetensors"),
        ("lora-export-dst-under-file", "lora", ["export", "{r}/tiny.safetensors", "{r}/a_file/o.safetensors",
                                                      "--format", "kohya"], "tiny.safetensors"),
        ("lora-merge-missing-base", "lora", ["merge", "{r}/missing.safetensors", "{r}/adapter.safetensors",
                                                   "{r}/o.safetensors"], "missing.safetensors"),
        ("lora-bad-option", "lora", ["export", "{r}/tiny.safetensors", "{r}/o.safetensors", "--format", "x"],
         "--format"),
        ("t2i-missing-ckpt", "text_to_image", ["--prompt", "a fox", "--ckpt_path", "{r}/missing.ckpt", *t2i],
         "missing.ckpt"),
        ("t2i-empty-prompt-file", "text_to_image", ["--data_path", "{r}/empty.txt", *t2i], "empty.txt"),
        ("t2i-latin1-prompt-file", "text_to_image", ["--data_path", "{r}/latin1.txt", *t2i], "latin1.txt:2"),
        ("t2i-missing-prompt-file", "text_to_image", ["--data_path", "{r}/missing.txt", *t2i], "missing.txt"),
        ("t2i-empty-prompt", "text_to_image", ["--prompt", "  ", *t2i], "empty"),
        ("t2i-output-under-file", "text_to_image", ["--prompt", "a fox", "--version", "2.1", "--output_path",
                                                    "{r}/a_file/out"], "a_file"),
        ("t2i-missing-lora", "text_to_image", ["--prompt", "a fox", "--use_lora", "True", "--lora_ckpt_path",
                                               "{r}/missing_lora.safetensors", *t2i], "missing_lora"),
        ("train-missing-data", "train", [*train, "--data_path", "{r}/no_data", "--output_path", "{r}/tr"], "no_data"),
        ("train-output-under-file", "train", [*train, "--data_path", "{r}/data", "--output_path", "{r}/a_file/o"],
         "a_file"),
        ("train-latin1-caption", "train", [*train, "--data_path", "{r}/latin_data", "--output_path", "{r}/tr"],
         "img_txt.csv:3"),
        ("train-blank-index", "train", [*train, "--data_path", "{r}/blank_data", "--output_path", "{r}/tr"],
         "img_txt.csv"),
        ("train-missing-base", "train", [*train, "--data_path", "{r}/data", "--output_path", "{r}/tr",
                                         "--pretrained_model_path", "{r}/missing.safetensors"], "missing.safetensors"),
        ("train-not-N_name", "train", [*train, "--data_path", "{r}/kohya_name", "--output_path", "{r}/tr"],
         "kohya_name/sks: subfolder name is not N_name"),
        ("train-missing-caption-strict", "train", [*train, "--data_path", "{r}/kohya_nocap", "--output_path", "{r}/tr",
                                                   "--strict_captions", "True"], "2_sks/a.png: no caption file a.txt"),
        ("train-dataset-config-key", "train", [*train, "--dataset_config", "{r}/bad_config.toml", "--output_path",
                                               "{r}/tr"], "bad_config.toml: datasets[0].subsets[0]: key 'flip_aug'"),
        ("train-image-below-min-bucket", "train", [*train, "--data_path", "{r}/kohya_small", "--output_path",
                                                   "{r}/tr", "--enable_bucket", "True", "--resolution", "32",
                                                   "--min_bucket_reso", "16", "--max_bucket_reso", "64",
                                                   "--bucket_reso_steps", "8", "--bucket_no_upscale", "True"],
         "1_sks/a.png: 12x40 is smaller than min_bucket_reso 16"),
        ("train-missing-resume", "train", [*train, "--data_path", "{r}/data", "--output_path", "{r}/tr", "--resume",
                                           "{r}/missing_state.safetensors"], "missing_state"),
        ("fid-missing-gen", "eval_fid", ["--real_dir", "{r}/images", "--gen_dir", "{r}/no_gen"], "no_gen"),
        ("fid-empty-gen", "eval_fid", ["--real_dir", "{r}/images", "--gen_dir", "{r}/empty_images"], "empty_images"),
        ("fid-json-under-file", "eval_fid", ["--real_dir", "{r}/images", "--gen_dir", "{r}/images", "--output_json",
                                             "{r}/a_file/fid.json"], "a_file"),
        ("clip-missing-images", "eval_clip_score", ["--image_dir", "{r}/no_images", "--prompts", "x", *clip],
         "no_images"),
        ("clip-empty-prompt-file", "eval_clip_score", ["--image_dir", "{r}/images", "--prompts", "{r}/empty.txt",
                                                       *clip], "empty.txt"),
        ("clip-blank-prompt-line", "eval_clip_score", ["--image_dir", "{r}/images", "--prompts",
                                                       "{r}/blank_middle.txt", *clip], "blank_middle.txt:2"),
        ("clip-latin1-prompt-file", "eval_clip_score", ["--image_dir", "{r}/images", "--prompts", "{r}/latin1.txt",
                                                        *clip], "latin1.txt:2"),
        ("clip-json-under-file", "eval_clip_score", ["--image_dir", "{r}/images", "--prompts", "x", *clip,
                                                     "--output_json", "{r}/a_file/c.json"], "a_file"),
        ("clip-missing-weights", "eval_clip_score", ["--image_dir", "{r}/images", "--prompts", "x", *clip],
         "no_clip"),
    ]  # fmt: skip


CASES = _cases()


def _argv(template: list[str], root: Path) -> list[str]:
    return [arg.replace("{r}", str(root)) for arg in template]


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_error_line(stderr: str, needle: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert needle in errors[0], errors[0]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("case, cli, template, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line(files, capsys, case, cli, template, needle):
    """Bad input to a CLI: one ``error:`` line naming the culprit, exit 2, nothing written."""
    root = files["root"]
    before = _listing(root)
    status = _main(cli)(_argv(template, root))
    captured = capsys.readouterr()
    assert status == 2, captured.err[-3000:]
    _one_error_line(captured.err, needle)
    assert _listing(root) == before


SUBPROCESS = ["convert-missing-src", "lora-export-missing", "t2i-latin1-prompt-file", "train-latin1-caption",
              "fid-missing-gen", "clip-latin1-prompt-file"]  # fmt: skip


@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_input_as_subprocess(files, case):
    """The same, run as a user runs it: a separate Python process, its exit status and its stderr."""
    _, cli, template, needle = next(c for c in CASES if c[0] == case)
    head = [sys.executable, "-m", f"ldm.{cli}"] if SCRIPTS[cli] is None else [sys.executable, str(SCRIPTS[cli])]
    run = subprocess.run([*head, *_argv(template, files["root"])], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    _one_error_line(run.stderr, needle)


@pytest.mark.parametrize("cli", ["convert", "lora"])
def test_disk_full_while_writing_output(files, capsys, monkeypatch, tmp_path, cli, disk_full_save_file):
    """ENOSPC half-way through writing the output file: one error line naming it, no file, no temp left."""
    import safetensors.numpy

    disk_full = disk_full_save_file

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    out = tmp_path / "out.safetensors"
    if cli == "convert":
        status = convert.main([str(files["root"] / "tiny.safetensors"), str(out)])
    else:
        tiny = str(CONFIG_DIR / "tiny/sd2-tiny.yaml")
        status = lora_main(["export", str(files["adapter"]), str(out), "--format", "kohya", "--config", tiny])
    captured = capsys.readouterr()
    assert status == 2, captured.err[-3000:]
    line = _one_error_line(captured.err, str(out.name))
    if cli == "convert":
        assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p == out) == []
