"""The text-to-image CLI end to end on the tiny SD2 model: files written, reproducibility, LoRA merging, bad input.

Every CLI run is a subprocess (graph mode, as users run it) with the CLI's own compile cache, keyed by configuration
(the test session's folder, ``tests/conftest.py``), so a run that repeats another's configuration reloads its graphs
and a run with other options never reuses them; the error cases run concurrently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.io.loading import cell_state_dict
from ldm.io.model_io import save_model
from ldm.lora.adapter import Adapter, make_adapter, write_adapter
from ldm.models.diffusion import build_model_from_config
from ldm.util import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/text_to_image.py"
CONFIG = ROOT / "ldm/configs/tiny/sd2-tiny.yaml"
SD1_CONFIG = ROOT / "ldm/configs/tiny/sd1-tiny.yaml"
N_SAMPLES, N_ITER, SIZE = 2, 2, 32
PER_RUN = N_SAMPLES * N_ITER


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("t2i")


def _cmd(work: Path, *extra) -> list:
    return [
        sys.executable,
        str(SCRIPT),
        "--config",
        str(CONFIG),
        "--H",
        str(SIZE),
        "--W",
        str(SIZE),
        "--sampling_steps",
        "3",
        "--n_samples",
        str(N_SAMPLES),
        "--n_iter",
        str(N_ITER),
        *map(str, extra),
    ]


def start_cli(work: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(_cmd(work, *extra), cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple:
    """(exit status, stdout, stderr)."""
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def _random_adapter(state: dict, family: str, rng, with_text_encoder: bool = False) -> Adapter:
    mods = {}
    for key, value in state.items():
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight")) and value.ndim == 2:
            out_dim, in_dim = value.shape
            down = rng.standard_normal((4, in_dim)).astype(np.float32) * 0.5
            up = rng.standard_normal((out_dim, 4)).astype(np.float32) * 0.5
            mods[key[: -len(".weight")]] = (down, up, 4.0)
    if with_text_encoder:
        key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
        three_d, d = state[key].shape
        mods[key.replace("in_proj_weight", "in_proj")] = (
            rng.standard_normal((2, d)).astype(np.float32),
            rng.standard_normal((three_d, 2)).astype(np.float32),
            2.0,
        )
    assert mods
    return make_adapter(mods, {"family": family})


@pytest.fixture(scope="module")
def files(work):
    """Tiny base weights, an SD2 adapter (UNet + text encoder modules) and an SD1 adapter."""
    rng = np.random.default_rng(0)
    config = load_config(CONFIG)
    model = build_model_from_config(config)
    weights = work / "tiny.safetensors"
    save_model(model, weights, config=config)
    lora = work / "lora_sd2.safetensors"
    write_adapter(lora, _random_adapter(cell_state_dict(model), "sd2", rng, with_text_encoder=True))
    sd1_state = cell_state_dict(build_model_from_config(load_config(SD1_CONFIG)))
    lora_sd1 = work / "lora_sd1.safetensors"
    write_adapter(lora_sd1, _random_adapter(sd1_state, "sd1", rng))
    empty = work / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    init, init_small = work / "init.png", work / "init_small.png"
    pixels = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(init)
    Image.fromarray(pixels[:24]).save(init_small)
    return {
        "weights": weights,
        "lora": lora,
        "lora_sd1": lora_sd1,
        "empty": empty,
        "init": init,
        "init_small": init_small,
    }


def _images(folder: Path, start: int, count: int) -> list:
    return [np.asarray(Image.open(folder / "samples" / f"{i:05d}.png")) for i in range(start, start + count)]


ERROR_CASES = {
    "missing_adapter": (["--use_lora", "True", "--lora_ckpt_path", "{work}/nope.safetensors"], "nope.safetensors"),
    "other_family": (["--use_lora", "True", "--lora_ckpt_path", "{lora_sd1}"], "lora_sd1.safetensors"),
    "empty_prompt_file": (["--data_path", "{empty}"], "empty.txt"),
    "size_not_multiple_of_8": (["--H", "36"], "--H 36"),
    "lora_scale_count": (
        ["--use_lora", "True", "--lora_ckpt_path", "{lora}", "--lora_scale", "1", "--lora_scale", "2"],
        "--lora_scale",
    ),
    "missing_ckpt": (["--ckpt_path", "{work}/missing.safetensors"], "missing.safetensors"),
    "unbalanced_bracket": (
        ["--prompt_weighting", "True", "--negative_prompt", "blurry, (low quality"],
        "'(' at character 9 is never closed",
    ),
    "clip_skip_too_deep": (["--clip_skip", "2"], "clip_skip 2 must be in [0, 1]"),
    "strength_zero": (["--init_image", "{init}", "--strength", "0"], "--strength 0.0 must be in (0, 1]"),
    "strength_above_one": (["--init_image", "{init}", "--strength", "1.5"], "--strength 1.5 must be in (0, 1]"),
    "strength_without_init_image": (["--strength", "0.5"], "--strength 0.5 needs --init_image"),
    "init_image_other_size": (["--init_image", "{init_small}"], "init image is 32x24 (W x H) but --W 32 --H 32"),
    "missing_init_image": (["--init_image", "{work}/nope.png"], "nope.png: init image not found"),
    "plms_img2img": (["--init_image", "{init}", "--sampler", "plms"], "--sampler plms cannot start from --init_image"),
}
IMG2IMG = ("--init_image", "{init}", "--strength", "0.7", "--vae_slicing", "True")


@pytest.fixture(scope="module")
def runs(work, files):
    """One run compiles the graphs (its cache folder); then, concurrently: the same run again into the same folder (must
    continue the numbering), the adapter at scale 1 and 0, img2img with the adapter and VAE slicing, and every
    bad-input case."""
    common = ("--prompt", "a red fox", "--ckpt_path", files["weights"])
    base = work / "base"
    first = finish(start_cli(work, *common, "--output_path", base))
    assert first[0] == 0, first[2][-3000:]
    procs = {"base2": start_cli(work, *common, "--output_path", base)}
    for scale in ("1.0", "0"):
        lora = ("--use_lora", "True", "--lora_ckpt_path", files["lora"], "--lora_scale", scale)
        procs[f"lora_{scale}"] = start_cli(work, *common, *lora, "--output_path", work / f"lora_{scale}")
    fmt = {"work": work, **files}
    img2img = [a.format(**fmt) for a in IMG2IMG]
    lora = ("--use_lora", "True", "--lora_ckpt_path", files["lora"])
    procs["img2img"] = start_cli(work, *common, *lora, *img2img, "--output_path", work / "img2img")
    for name, (extra, _) in ERROR_CASES.items():
        args = [a.format(**fmt) for a in extra]
        if "--data_path" not in args:
            args = ["--prompt", "a fox", *args]
        if "--ckpt_path" not in args:
            args += ["--ckpt_path", str(files["weights"])]
        procs[f"error_{name}"] = start_cli(work, *args, "--output_path", work / f"err_{name}")
    results = {"base": first, **{name: finish(p) for name, p in procs.items()}}
    for name in ("base2", "lora_1.0", "lora_0", "img2img"):
        assert results[name][0] == 0, results[name][2][-3000:]
    return results


def test_outputs_and_sidecars(work, runs, files):
    out = work / "base"
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == [f"{i:05d}.{ext}" for i in range(2 * PER_RUN) for ext in ("json", "png")]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0.png", "grid-1.png"]
    for image in _images(out, 0, 2 * PER_RUN):
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    grid = np.asarray(Image.open(out / "grid-0.png"))
    assert grid.shape == (N_ITER * SIZE, N_SAMPLES * SIZE, 3)
    metas = [json.loads((out / "samples" / f"{i:05d}.json").read_text()) for i in range(PER_RUN)]
    assert [m["seed"] for m in metas] == [42, 42, 43, 43]
    meta = metas[0]
    assert meta["prompt"] == "a red fox" and meta["negative_prompt"] == ""
    assert (meta["sampler"], meta["steps"], meta["scale"], meta["H"], meta["W"]) == ("dpm_solver_pp", 3, 9.0, 32, 32)
    assert meta["config"] == str(CONFIG) and meta["ckpt_path"] == str(files["weights"]) and meta["adapters"] == []
    assert "images/s" in runs["base"][1]
    # iterations use different seeds, so their images differ
    first = _images(out, 0, PER_RUN)
    assert not np.array_equal(first[0], first[2])


def test_same_seed_reproduces_images(work, runs):
    out = work / "base"
    first, second = _images(out, 0, PER_RUN), _images(out, PER_RUN, PER_RUN)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_adapter_changes_images_and_scale_zero_reproduces_base(work, runs, files):
    base = _images(work / "base", 0, PER_RUN)
    lora_out = work / "lora_1.0"
    with_lora = _images(lora_out, 0, PER_RUN)
    assert any(not np.array_equal(a, b) for a, b in zip(base, with_lora))
    assert "text-encoder" in runs["lora_1.0"][1]  # --lora_ft_text_encoder off: TE modules dropped with a note
    meta = json.loads((lora_out / "samples" / "00000.json").read_text())
    assert meta["adapters"] == [{"path": str(files["lora"]), "scale": 1.0}]
    zero = _images(work / "lora_0", 0, PER_RUN)
    for a, b in zip(base, zero):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_fails_with_one_line(runs, case):
    code, _stdout, stderr = runs[f"error_{case}"]
    assert code == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ERROR_CASES[case][1] in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    if case == "other_family":
        assert "'sd1'" in errors[0] and "'sd2'" in errors[0]


def test_img2img_with_lora_and_vae_memory_options(work, runs, files):
    """img2img runs with an adapter and sliced VAE decode, records its init image and strength, and starts
    from the image: the same seed and adapter give other images than text-to-image."""
    meta = json.loads((work / "img2img/samples/00000.json").read_text(encoding="utf-8"))
    assert meta["init_image"] == str(files["init"]) and meta["strength"] == 0.7
    ours, text_only = _images(work / "img2img", 0, PER_RUN), _images(work / "lora_1.0", 0, PER_RUN)
    assert all(a.shape == (SIZE, SIZE, 3) for a in ours)
    assert all(not np.array_equal(a, b) for a, b in zip(ours, text_only))
