"""DreamBooth: options and bad input, class-image generation (count, resume after a kill, reuse, regeneration),
pairing of instance and class rows, and a short training run through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.dreambooth import check_instance_prompt, instance_then_class, scan_image_folder
from ldm.train.class_images import MANIFEST, ClassImageSpec, ensure_class_images, generated_name, plan_class_images

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
TINY = ROOT / "configs/train/train_config_dreambooth_lora_tiny.yaml"
SPEC = ClassImageSpec(prompt="a clip art drawing of a flag", seed=7, base_model="abc", size=8)


def write_images(folder: Path, count: int, start: int = 0, size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + count):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class FakeGenerator:
    """Stands in for the base model: image ``i`` of a spec is a constant grey derived from the spec and ``i``."""

    def __init__(self, spec: ClassImageSpec):
        self.spec, self.calls = spec, []

    def __call__(self, prompts, indices):
        assert prompts == [self.spec.prompt] * len(indices)
        self.calls.append(list(indices))
        shade = [(hash((self.spec.prompt, self.spec.base_model)) + 13 * i) % 256 for i in indices]
        return np.stack([np.full((self.spec.size, self.spec.size, 3), s, np.uint8) for s in shade])


def test_generates_the_missing_count_and_keeps_user_images(tmp_path):
    folder = tmp_path / "class"
    user = write_images(folder, 2)
    gen = FakeGenerator(SPEC)
    paths = ensure_class_images(folder, SPEC, 5, gen, sample_batch_size=2)
    assert gen.calls == [[0, 1], [2]]  # 5 - 2 user images, in batches of 2
    assert [Path(p).name for p in paths] == ["00.png", "01.png", *(generated_name(i) for i in range(3))]
    assert all(p.is_file() for p in user)
    assert json.loads((folder / MANIFEST).read_text())["spec"]["prompt"] == SPEC.prompt
    assert not list(folder.glob(".*tmp"))


def test_reused_while_the_manifest_matches_and_regenerated_when_not(tmp_path):
    folder = tmp_path / "class"
    ensure_class_images(folder, SPEC, 3, FakeGenerator(SPEC))
    before = {p.name: p.read_bytes() for p in folder.glob("class-*.png")}
    again = FakeGenerator(SPEC)
    ensure_class_images(folder, SPEC, 3, again)
    assert again.calls == []  # same spec: reused
    more = FakeGenerator(SPEC)
    ensure_class_images(folder, SPEC, 4, more)
    assert more.calls == [[3]]  # a larger count adds only the new ones
    for changed in (
        ClassImageSpec(**{**SPEC.__dict__, "base_model": "def"}),
        ClassImageSpec(**{**SPEC.__dict__, "prompt": "a clip art drawing of a dog"}),
    ):
        gen = FakeGenerator(changed)
        ensure_class_images(folder, changed, 3, gen)
        assert gen.calls == [[0, 1, 2]]  # everything drawn again
        assert sorted(p.name for p in folder.glob("class-*.png")) == [generated_name(i) for i in range(3)]
    assert (folder / generated_name(0)).read_bytes() != before[generated_name(0)]


def test_files_without_a_manifest_are_the_users(tmp_path):
    folder = tmp_path / "class"
    write_images(folder, 1)
    os.replace(folder / "00.png", folder / generated_name(0))  # named like ours, but no manifest says so
    plan = plan_class_images(folder, SPEC, 3)
    assert [Path(p).name for p in plan.user] == [generated_name(0)] and plan.missing == [0, 1]


KILLED_CHILD = """
import sys, time
import numpy as np
from ldm.train.class_images import ClassImageSpec, ensure_class_images
spec = ClassImageSpec(prompt="a clip art drawing of a flag", seed=7, base_model="abc", size=8)
def slow(prompts, indices):
    time.sleep(0.3)
    return np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in indices])
ensure_class_images(sys.argv[1], spec, 50, slow, sample_batch_size=1)
"""


def test_resumes_after_a_kill_without_partial_files(tmp_path):
    folder = tmp_path / "class"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(folder)], env=env)
    deadline = time.monotonic() + 60
    while len(list(folder.glob("class-*.png"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = sorted(folder.glob("class-*.png"))
    assert 3 <= len(written) < 50
    for path in written:  # every file there is a whole PNG
        with Image.open(path) as img:
            img.load()
    kept = {p.name: p.read_bytes() for p in written}
    gen = FakeGenerator(SPEC)
    paths = ensure_class_images(folder, SPEC, 50, gen, sample_batch_size=16)
    assert len(paths) == 50 and sum(map(len, gen.calls)) == 50 - len(written)
    assert all((folder / name).read_bytes() == data for name, data in kept.items())  # not drawn again
    assert not list(folder.glob(".*"))


def test_pairs_become_instance_rows_then_class_rows():
    batch = np.arange(3 * 2 * 2).reshape(3, 2, 2)  # 3 samples, (instance, class), 2 values
    np.testing.assert_array_equal(instance_then_class(batch), np.concatenate([batch[:, 0], batch[:, 1]]))


def test_rank_rows_of_pairs_match_one_process():
    """Two ranks' noise rows, each ordered instance-then-class, are the rows one process gives the same samples."""
    import mindspore as ms

    from ldm.env import DistInfo
    from ldm.train.trainer import _rank_rows

    draw = ms.Tensor(np.arange(8 * 3, dtype=np.float32).reshape(8, 3))  # 4 samples x 2 rows
    single = _rank_rows([draw], DistInfo(), 2)[0].asnumpy()
    pairs = draw.asnumpy().reshape(4, 2, 3)
    np.testing.assert_array_equal(single, np.concatenate([pairs[:, 0], pairs[:, 1]]))
    for rank in (0, 1):
        mine = _rank_rows([draw], DistInfo(rank, 2), 2)[0].asnumpy()
        np.testing.assert_array_equal(mine, np.concatenate([pairs[rank::2, 0], pairs[rank::2, 1]]))


def test_instance_prompt_checks():
    check_instance_prompt("a sks flag", "a flag")
    with pytest.raises(ValueError, match="no token the tokenizer keeps"):
        check_instance_prompt("   ")
    with pytest.raises(ValueError, match="tokenizer keeps 75 and cuts the rest"):
        check_instance_prompt("a " * 80 + "sks flag")
    with pytest.raises(ValueError, match="has no token that class_prompt 'a flag' lacks"):
        check_instance_prompt("A  flag", "a flag")


def test_scan_skips_non_images_and_needs_one(tmp_path):
    write_images(tmp_path / "inst", 2)
    (tmp_path / "inst" / "notes.txt").write_text("x")
    records = scan_image_folder(tmp_path / "inst", "instance_data_dir", "a sks flag")
    assert [Path(r.path).name for r in records] == ["00.png", "01.png"] and records[0].captions == ("a sks flag",)


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(
    "case, needle",
    [
        ("no_images", "{inst}: no usable images (1 listed in instance_data_dir are missing or corrupt)"),
        ("no_class_prompt", "with_prior_preservation needs class_prompt"),
        ("cut_token", "the tokenizer keeps 75 and cuts the rest"),
        ("same_as_class", "has no token that class_prompt 'a clip art drawing of a flag' lacks"),
    ],
)
def test_bad_input_is_one_line(tmp_path, case, needle):
    inst = tmp_path / "inst"
    write_images(inst, 1)
    if case == "no_images":
        (inst / "00.png").write_bytes(b"not a png")
    prompt = {"cut_token": "a " * 80 + "sks flag", "same_as_class": "a clip art drawing of a flag"}
    args = ["--train_config", str(TINY), "--instance_data_dir", str(inst), "--output_path", str(tmp_path / "out")]
    args += ["--class_data_dir", str(tmp_path / "class"), "--instance_prompt", prompt.get(case, "a sks flag")]
    args += [
        "--max_train_steps",
        "1",
        "--class_prompt",
        "" if case == "no_class_prompt" else "a clip art drawing of a flag",
    ]
    run = _run(*args)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle.format(inst=inst) in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "class").exists()


def _train(tmp_path, user_class_images: int, *extra):
    inst, cls, out = tmp_path / "inst", tmp_path / "class", tmp_path / "out"
    write_images(inst, 2)
    write_images(cls, user_class_images, start=5)
    args = ["--train_config", str(TINY), "--instance_data_dir", str(inst), "--class_data_dir", str(cls)]
    args += ["--output_path", str(out), "--max_train_steps", "2", "--num_class_images", "2", "--train_batch_size", "2"]
    run = _run(*args, "--model_config", "ldm/configs/tiny/sd1-tiny.yaml", "--image_size", "32", *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    weight = 0.5  # the tiny recipe's prior_loss_weight
    for r in records:
        assert r["loss"] == pytest.approx(r["instance_loss"] + weight * r["prior_loss"], rel=1e-5)
    assert (out / "ckpt" / "lora-000002.safetensors").is_file()
    return sorted(p.name for p in cls.iterdir())


def test_short_cli_run_logs_both_terms(tmp_path):
    """Two user class images are enough: nothing is generated (op by op: no compile for two steps)."""
    assert _train(tmp_path, 2, "--mode", "1") == ["05.png", "06.png"]


@pytest.mark.slow
def test_cli_run_generates_the_missing_class_image(tmp_path):
    """The base model draws the second class image through the pipeline (compiled: minutes on a shared CPU)."""
    assert _train(tmp_path, 1) == sorted(["05.png", MANIFEST, generated_name(0)])


def test_memory_plan_counts_the_class_rows(monkeypatch):
    """With prior preservation a step runs 2 x train_batch_size rows (instances, then class images): the memory plan
    is asked about that batch."""
    import ldm.train.trainer as trainer
    from ldm.train.options import TrainOptions
    from ldm.util import CONFIG_DIR, load_config

    jobs = []
    real = trainer.plan_training
    monkeypatch.setattr(trainer, "plan_training", lambda config, job, *a: jobs.append(job) or real(config, job, *a))
    config = load_config(CONFIG_DIR / "tiny/sd1-tiny.yaml")
    for prior in (False, True):
        opts = TrainOptions(train_batch_size=3, image_size=32, with_prior_preservation=prior)
        trainer.plan_memory(opts, config)
    assert [job.batch for job in jobs] == [3, 6]
