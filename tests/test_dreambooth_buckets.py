"""DreamBooth with aspect-ratio buckets and kohya dataset configs, on the data alone (no model, seconds).

Pair ``k`` of an epoch is instance ``k % I`` and class image ``k % C``; with buckets the pair trains at its instance's
bucket (the class image is resized to cover it and cropped), so every batch is B instance rows and B class rows of one
resolution, every rank trains the same bucket at each step and N ranks with batch B hold one process's batch N*B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import BucketSpec, CacheEncoders, CaptionRules, RunOrder, build_pipeline
from ldm.data.buckets import cover
from ldm.data.dreambooth import dreambooth_data, instance_then_class, scan_image_folder
from ldm.data.kohya import FolderOptions, read_records
from ldm.io.checkpoint import read_state_dict
from ldm.train.options import TrainOptions, check_dreambooth, dreambooth_config_records

# area 32x32, sides 16..64 in steps of 8: 48x32 -> 40x24, 32x48 -> 24x40, 32x32 -> 32x32
SPEC = BucketSpec((32, 32), 16, 64, 8)
INSTANCE_SIZES = [(48, 32), (32, 48), (32, 32), (32, 48), (48, 32)]  # class images 0 and 1 train in 2 buckets
CLASS_SIZES = [(32, 32), (40, 40), (36, 36)]


def write_images(folder: Path, sizes, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def tokenize(texts):
    """Stands in for the CLIP tokenizer: the caption's length and first character, so captions are told apart."""
    return np.array([[len(t), ord(t[0]) if t else 0] for t in texts], dtype=np.int32)


@pytest.fixture
def folders(tmp_path):
    return write_images(tmp_path / "inst", INSTANCE_SIZES), write_images(tmp_path / "cls", CLASS_SIZES, seed=1)


def _data(folders, buckets=SPEC, **kwargs):
    instances = scan_image_folder(folders[0], "instance_data_dir", "a sks thing")
    classes = scan_image_folder(folders[1], "class_data_dir", "a thing")
    return dreambooth_data(instances, classes, tokenize, 32, seed=3, buckets=buckets, **kwargs)


def test_pairs_train_at_their_instance_bucket(folders):
    data = _data(folders)
    instances, classes = data.sources
    assert len(data) == 5  # max(5 instances, 3 class images)
    for k in range(len(data)):
        assert instances.records[k].path.endswith(f"{k % 5:02d}.png") and classes.records[k].path.endswith(
            f"{k % 3:02d}.png"
        )
        bucket = instances.placements[k].bucket
        w, h = CLASS_SIZES[k % 3]
        assert classes.placements[k] == cover(w, h, bucket)  # resized to cover the instance's bucket
    assert [p.bucket for p in instances.placements] == [(40, 24), (24, 40), (32, 32), (24, 40), (40, 24)]
    assert "24x40   0.600  2" in data.bucket_table


def test_batches_are_one_bucket_of_instance_then_class_rows(folders):
    """Each batch is [B, 2, 3, H, W] of one bucket; instance_then_class gives the B instance rows first, which are
    the instance source's images of the sampled pairs, then their class images."""
    data = _data(folders, flip=True)
    sampler = data.sampler(RunOrder(2, seed=3, num_epochs=2))
    ids = list(sampler)
    pipeline = build_pipeline(data, RunOrder(2, seed=3, num_epochs=2))
    batches = list(pipeline.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert len(batches) == len(ids) // 2 == 2 * 3  # per epoch: buckets of 2, 2 and 1 pairs, each filled to 2
    instances, classes = data.sources
    for step, (images, tokens) in enumerate(batches):
        pair_ids = ids[2 * step : 2 * step + 2]
        h, w = images.shape[-2:]
        assert images.shape == (2, 2, 3, h, w)
        assert {instances.placements[i % 5].bucket for i in pair_ids} == {(w, h)}
        rows = instance_then_class(images)
        want = [instances.image(i) for i in pair_ids] + [classes.image(i) for i in pair_ids]
        np.testing.assert_array_equal(rows, np.stack(want))
        np.testing.assert_array_equal(instance_then_class(tokens)[:, 0], [11, 11, 7, 7])  # len of the two prompts
    flips = [(instances.mirrored(i), classes.mirrored(i)) for i in range(40)]
    assert {a != b for a, b in flips} == {True, False}  # a pair's two flips are drawn independently


@pytest.mark.parametrize("buckets", [SPEC, None], ids=["buckets", "square"])
def test_rank_split_sees_one_bucket_per_step_and_the_global_batch(folders, buckets):
    """2 ranks x batch 2: at every step both ranks hold pairs of one bucket, and together the pairs of one process
    with batch 4 at that step (also after a resume)."""
    data = _data(folders, buckets)
    bucket = [p.bucket for p in data.placements] if buckets else [(32, 32)] * len(data)
    single = list(data.sampler(RunOrder(4, seed=3, num_epochs=3)))
    ranks = [list(data.sampler(RunOrder(2, seed=3, rank=r, world_size=2, num_epochs=3))) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
    for step in range(len(single) // 4):
        mine = [ids[2 * step : 2 * step + 2] for ids in ranks]
        assert len({bucket[i % len(data)] for part in mine for i in part}) == 1
        assert sorted(mine[0] + mine[1]) == sorted(single[4 * step : 4 * step + 4])
    resumed = list(data.sampler(RunOrder(2, seed=3, rank=1, world_size=2, num_epochs=3, batches_done=2)))
    assert resumed == ranks[1][4:]


def test_without_buckets_pairs_keep_the_square_size(folders):
    data = _data(folders, buckets=None)
    assert data.placements is None and data.bucket_table is None
    images, _ = data.combine(*data.sources)[7]
    assert images.shape == (2, 3, 32, 32)


def test_cached_pairs_equal_uncached_id_by_id(folders):
    """A class image that trains in two buckets is cached once per bucket; every cached sample (the identity
    'encoder' keeps the image) equals the uncached one, flips included."""
    data = _data(folders, flip=True)
    cached = build_pipeline(data, RunOrder(2, seed=3, num_epochs=2), cache=CacheEncoders(images=lambda x: x))
    plain = build_pipeline(data, RunOrder(2, seed=3, num_epochs=2))
    pairs = zip(cached.create_tuple_iterator(output_numpy=True), plain.create_tuple_iterator(output_numpy=True))
    for (a, _), (b, _) in pairs:
        np.testing.assert_array_equal(a, b)


def _config(tmp_path, folders, reg_table: str = "is_reg = true", general: str = "") -> Path:
    path = tmp_path / "db.toml"
    path.write_text(
        f"[general]\n{general}\n[[datasets]]\nresolution = 32\nenable_bucket = true\n"
        f'[[datasets.subsets]]\nimage_dir = "{folders[0]}"\nclass_tokens = "sks thing"\nnum_repeats = 2\n'
        f'[[datasets.subsets]]\nimage_dir = "{folders[1]}"\nclass_tokens = "thing"\n{reg_table}\n'
    )
    return path


def test_kohya_is_reg_subsets_are_the_class_images(tmp_path, folders):
    (folders[0] / "01.txt").write_text("sks thing, sitting\n")
    config = _config(tmp_path, folders, general="caption_prefix = 'photo of'")
    opts = TrainOptions(dataset_config=str(config), with_prior_preservation=True)
    check_dreambooth(opts)
    label, instances, classes, rules = dreambooth_config_records(opts)
    assert label == str(config) and len(instances) == 10 and len(classes) == 3  # num_repeats 2 on the instances
    assert {r.captions for r in instances} == {("sks thing",), ("sks thing, sitting",)}
    assert {r.captions for r in classes} == {("thing",)} and {r.subset for r in classes} == {1}
    data = dreambooth_data(instances, classes, tokenize, 32, buckets=SPEC, subset_rules=rules, label=label)
    assert len(data) == 10 and data.sources[1].caption(4) == "photo of thing"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("no_prior", "subsets[1] has is_reg = true: class images train only with with_prior_preservation"),
        ("no_reg", "with_prior_preservation needs an is_reg = true subset (the class images); there is none"),
        ("general", "[general]: key 'is_reg' is not supported in this table"),
        ("bad_value", "key 'is_reg' has a wrong value 'yes'"),
    ],
)
def test_kohya_bad_dreambooth_configs_are_named(tmp_path, folders, case, needle):
    reg = {"no_reg": "", "general": "", "bad_value": "is_reg = 'yes'"}.get(case, "is_reg = true")
    config = _config(tmp_path, folders, reg, general="is_reg = true" if case == "general" else "")
    folder = FolderOptions(str(config), is_reg=None if case == "no_prior" else True)
    with pytest.raises(ValueError) as err:
        read_records("", folder, CaptionRules())
    assert needle in str(err.value) and str(config) in str(err.value)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"instance_prompt": "a sks thing"}, "give instance_prompt or dataset_config, not both"),
        ({"class_data_dir": "c"}, "give class_data_dir or dataset_config, not both"),
        ({"validation_split": 0.1}, "validation_split does not work with DreamBooth yet"),
    ],
)
def test_dreambooth_option_conflicts_with_a_dataset_config(options, needle):
    with pytest.raises(ValueError, match=needle):
        check_dreambooth(TrainOptions(dataset_config="db.toml", with_prior_preservation=True, **options))


# CLI runs: the tiny SD1 config at 32 px, PyNative (no graph compiled per bucket), through the reliability driver
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples/stable_diffusion_v2/train_text_to_image.py"
DRIVER = ROOT / "tests/reliability/train_driver.py"
RECIPE = ROOT / "configs/train/train_config_dreambooth_lora_tiny.yaml"
BUCKET_KEYS = "min_bucket_reso = 16\nmax_bucket_reso = 64\nbucket_reso_steps = 8\n"


def _train(config: Path, out: Path, *args: str):
    cmd = [sys.executable, str(DRIVER), str(SCRIPT), "--train_config", str(RECIPE), "--dataset_config", str(config)]
    cmd += ["--instance_prompt", "", "--class_prompt", "", "--model_config", "ldm/configs/tiny/sd1-tiny.yaml"]
    cmd += ["--image_size", "32", "--train_batch_size", "2", "--mode", "1", "--output_path", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def kohya_run(tmp_path_factory):
    """A 3-step bucketed DreamBooth run from a kohya config (checkpoint at step 2), cached latents and texts."""
    root = tmp_path_factory.mktemp("db_kohya")
    folders = write_images(root / "inst", INSTANCE_SIZES), write_images(root / "cls", CLASS_SIZES, seed=1)
    config = _config(root, folders, general=BUCKET_KEYS)
    out = root / "straight"
    run = _train(config, out, "--max_train_steps", "3", "--ckpt_save_interval", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    return root, config, out, run


def test_cli_kohya_bucketed_dreambooth_logs_both_terms(kohya_run):
    """Every step trains one bucket of 2 pairs; loss = instance_loss + prior_loss_weight * prior_loss (the recipe's
    0.5) as diffusers splits it."""
    _, _, out, run = kohya_run
    assert "DreamBooth: 10 instance images, 3 class images; 10 pairs per epoch" in run.stderr
    table = run.stderr[run.stderr.index("aspect-ratio buckets") :]
    assert "24x40   0.600  4" in table and "40x24   1.667  4" in table, table[:300]
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {m["bucket"] for m in metrics} <= {"24x40", "40x24", "32x32"}
    for m in metrics:
        assert m["loss"] == pytest.approx(m["instance_loss"] + 0.5 * m["prior_loss"], rel=1e-5)


def _logged(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("step_time_s", "peak_rss_gib")}


def test_cli_resume_is_exact_and_checks_the_bucket_order(kohya_run):
    """2 steps, then ``--resume True`` to 3: the logged losses, buckets and the adapter equal the straight run's bit
    for bit; a resume whose buckets differ is refused by name."""
    root, config, straight, _ = kohya_run
    out = root / "resumed"
    first = _train(config, out, "--max_train_steps", "2", "--ckpt_save_interval", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    other = config.with_name("other.toml")
    other.write_text(config.read_text().replace("bucket_reso_steps = 8", "bucket_reso_steps = 16"))
    refused = _train(other, out, "--max_train_steps", "3", "--ckpt_save_interval", "2", "--resume", "True")
    assert refused.returncode == 2 and "bucket order" in refused.stderr, refused.stderr[-2000:]
    second = _train(config, out, "--max_train_steps", "3", "--ckpt_save_interval", "2", "--resume", "True")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [_logged(m) for m in _metrics(out)] == [_logged(m) for m in _metrics(straight)]
    names = sorted(p.name for p in (straight / "ckpt").glob("lora-*.safetensors"))
    assert names == sorted(p.name for p in (out / "ckpt").glob("lora-*.safetensors")) and names
    for name in names:
        a, b = read_state_dict(out / "ckpt" / name), read_state_dict(straight / "ckpt" / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b), name


def test_cli_instance_folders_with_buckets(tmp_path, folders):
    """diffusers' options (instance and class folders; 3 class images already there, so none is generated) with
    --enable_bucket: the pairs train at the instance buckets and both loss terms are logged."""
    cmd = [sys.executable, str(SCRIPT), "--train_config", str(RECIPE), "--instance_data_dir", str(folders[0])]
    cmd += ["--class_data_dir", str(folders[1]), "--num_class_images", "3", "--model_config"]
    cmd += ["ldm/configs/tiny/sd1-tiny.yaml", "--image_size", "32", "--train_batch_size", "2", "--mode", "1"]
    cmd += ["--max_train_steps", "2", "--output_path", str(tmp_path / "out"), "--enable_bucket", "True"]
    cmd += ["--resolution", "32", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8"]
    run = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "DreamBooth: 5 instance images, 3 class images; 5 pairs per epoch" in run.stderr
    metrics = _metrics(tmp_path / "out")
    assert [m["step"] for m in metrics] == [1, 2] and {m["bucket"] for m in metrics} <= {"24x40", "40x24", "32x32"}
    for m in metrics:
        assert m["loss"] == pytest.approx(m["instance_loss"] + 0.5 * m["prior_loss"], rel=1e-5)
    assert sorted(p.name for p in folders[1].iterdir()) == ["00.png", "01.png", "02.png"]  # nothing generated
