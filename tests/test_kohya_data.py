"""kohya's dataset layout and caption rules (ldm.data.kohya, ldm.data.captions): N_name repeats, caption sidecars,
dataset configs (TOML and YAML) with subsets, keys refused by name, and shuffle_caption + keep_tokens, tag dropout,
prefix/suffix, each drawn from the sample's own generator."""

import numpy as np
import pytest
from PIL import Image

import ldm  # noqa: F401  (must precede mindspore)
from ldm.data import CaptionRules, FolderOptions, ImageCaptionSource, read_dataset_config
from ldm.train.options import parse_options

TAGS = "sks, red, circle, white background, flat, drawing"


def _folder(root, name, count, captions=True, size=(24, 16)):
    sub = root / name
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (10 * i, 0, 0)).save(sub / f"{i}.png")
        if captions:
            (sub / f"{i}.txt").write_text(f"{name} {i}, tag a, tag b\nsecond line is ignored\n", encoding="utf-8")
    return sub


# ----------------------------------------------------------------------------------------------- captions
def test_prefix_and_suffix():
    rules = CaptionRules(caption_prefix="photo of sks,", caption_suffix="- high quality")
    assert rules.apply("a dog", np.random.default_rng(0)) == "photo of sks, a dog - high quality"


def test_shuffle_keeps_the_first_keep_tokens_in_place():
    """Over 200 draws the first two tags never move and the rest take many orders (all four tags always present)."""
    rules = CaptionRules(shuffle_caption=True, keep_tokens=2)
    outs = [rules.apply(TAGS, np.random.default_rng([1, i])).split(", ") for i in range(200)]
    assert all(out[:2] == ["sks", "red"] and sorted(out[2:]) == sorted(TAGS.split(", ")[2:]) for out in outs)
    assert len({tuple(out) for out in outs}) == 24  # 4! orders of the four others
    unkept = CaptionRules(shuffle_caption=True)
    assert {unkept.apply(TAGS, np.random.default_rng([1, i])).split(", ")[0] for i in range(200)} > {"sks"}


def test_tag_dropout_rate_and_kept_tags():
    """Rate 0.25 drops about a quarter of the four droppable tags (800 draws: 0.25 +- 0.05), never a kept one."""
    rules = CaptionRules(caption_tag_dropout_rate=0.25, keep_tokens=2)
    outs = [rules.apply(TAGS, np.random.default_rng([2, i])).split(", ") for i in range(200)]
    assert all(out[:2] == ["sks", "red"] for out in outs)
    dropped = sum(6 - len(out) for out in outs) / (4 * len(outs))
    assert 0.2 < dropped < 0.3, dropped
    kept_order = [t for t in TAGS.split(", ")]
    assert all(out == [t for t in kept_order if t in out] for out in outs)  # without shuffle the order stays


def test_caption_dropout_empties_and_is_drawn_first():
    assert CaptionRules(caption_dropout_rate=1.0, caption_prefix="x").apply(TAGS, np.random.default_rng(0)) == ""
    with pytest.raises(ValueError, match="caption_tag_dropout_rate must be in"):
        CaptionRules(caption_tag_dropout_rate=1.5)


def test_source_captions_are_reproducible_per_sample(tmp_path):
    """The same sample id gives the same shuffled caption in a new source (as after a resume); other ids differ."""
    root = tmp_path / "d"
    _folder(root, "1_sks", 2)
    rules = CaptionRules(shuffle_caption=True, caption_tag_dropout_rate=0.3, keep_tokens=1, caption_prefix="pre")
    first = ImageCaptionSource(root, captions=rules, seed=4)
    again = ImageCaptionSource(root, captions=rules, seed=4)
    texts = [first.caption(i) for i in range(40)]
    assert texts == [again.caption(i) for i in range(40)]
    assert all(t.startswith(("pre 1_sks 0", "pre 1_sks 1")) for t in texts) and len(set(texts)) > 4


# ----------------------------------------------------------------------------------------------- folder layout
def test_repeats_folders_and_sidecars(tmp_path):
    """3_sks (2 images) and 1_cat (1 image): 7 records per epoch, the first line of each sidecar as caption."""
    root = tmp_path / "d"
    _folder(root, "3_sks", 2)
    _folder(root, "1_cat", 1)
    source = ImageCaptionSource(root, image_size=8)
    paths = [r.path.rsplit("/", 2)[-2:] for r in source.records]
    assert paths == [["1_cat", "0.png"]] + [["3_sks", "0.png"]] * 3 + [["3_sks", "1.png"]] * 3
    assert [source.caption(i) for i in (0, 1, 4)] == ["1_cat 0, tag a, tag b", "3_sks 0, tag a, tag b"] + [
        "3_sks 1, tag a, tag b"
    ]


def test_missing_sidecar_warns_with_class_tokens_or_errors_when_strict(tmp_path, caplog):
    root = tmp_path / "d"
    sub = _folder(root, "2_sks dog", 2)
    (sub / "1.txt").unlink()
    source = ImageCaptionSource(root)
    assert source.caption(2) == "sks dog"
    assert f"{sub / '1.png'} (caption 'sks dog')" in caplog.text
    with pytest.raises(ValueError, match=f"{sub / '1.png'}: no caption file 1.txt"):
        ImageCaptionSource(root, folder=FolderOptions(strict_captions=True))


def test_caption_extension(tmp_path):
    root = tmp_path / "d"
    sub = _folder(root, "1_x", 1, captions=False)
    (sub / "0.caption").write_text("from the caption file", encoding="utf-8")
    source = ImageCaptionSource(root, folder=FolderOptions(caption_extension=".caption"))
    assert source.caption(0) == "from the caption file"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: _folder(root, "sks", 1), "subfolder name is not N_name"),
        (lambda root: _folder(root, "0_sks", 1), "the repeat count must be >= 1"),
        (lambda root: (_folder(root, "1_sks", 1), Image.new("RGB", (4, 4)).save(root / "x.png")), "beside N_name"),
        (lambda root: root.mkdir(), "no img_txt.csv, metadata.jsonl, images"),
        (lambda root: (_folder(root, "1_a", 1), (root / "1_a" / "0.txt").write_text("\n")), "empty caption file"),
    ],
    ids=["not-N_name", "zero-repeats", "loose-images", "empty", "empty-caption"],
)
def test_bad_folders_are_one_clear_error(tmp_path, make, message):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(ValueError, match=message):
        ImageCaptionSource(root)


# ----------------------------------------------------------------------------------------------- dataset config
CONFIG = """
[general]
shuffle_caption = true
caption_extension = ".txt"

[[datasets]]
resolution = [48, 32]
enable_bucket = true
bucket_reso_steps = 8
min_bucket_reso = 16

  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 2
  keep_tokens = 1
  caption_prefix = "pre"

  [[datasets.subsets]]
  image_dir = "{b}"
  shuffle_caption = false
  class_tokens = "b class"
"""


def test_dataset_config_subsets_and_options(tmp_path):
    a = _folder(tmp_path, "a", 2)
    b = _folder(tmp_path, "b", 1)
    (b / "0.txt").unlink()
    path = tmp_path / "ds.toml"
    path.write_text(CONFIG.format(a=a, b=b))
    config = read_dataset_config(path, rules=CaptionRules(caption_suffix="suf"))
    assert config.options == {
        "resolution": "48,32",
        "enable_bucket": True,
        "bucket_reso_steps": 8,
        "min_bucket_reso": 16,
    }
    first, second = config.subsets
    assert (first.num_repeats, first.rules.shuffle_caption, first.rules.keep_tokens) == (2, True, 1)
    assert (first.rules.caption_prefix, first.rules.caption_suffix) == ("pre", "suf")  # suffix from the options
    assert (second.num_repeats, second.rules.shuffle_caption, second.class_tokens) == (1, False, "b class")

    source = ImageCaptionSource("", folder=FolderOptions(dataset_config=str(path)), seed=1)
    assert len(source) == 5
    assert source.caption(4) == "b class"  # no sidecar, not shuffled
    assert all(source.caption(i).startswith("pre a ") for i in range(4))

    yaml_path = tmp_path / "ds.yaml"
    yaml_path.write_text(
        f"general: {{shuffle_caption: true}}\ndatasets:\n  - resolution: 32\n    subsets:\n      - image_dir: {a}\n"
    )
    assert read_dataset_config(yaml_path).subsets[0].rules.shuffle_caption

    opts = parse_options(["--dataset_config", str(path), "--resolution", "64", "--output_path", str(tmp_path / "o")])
    assert (opts.enable_bucket, opts.resolution, opts.bucket_reso_steps) == (True, "48,32", 8)  # the config wins


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("keep_tokens = 1", "keep_tokens = 1\n  flip_aug = true"), "'flip_aug' is not supported"),
        (lambda t: t.replace("num_repeats = 2", "num_repeat = 2"), "subsets\\[0\\]: unknown key 'num_repeat'"),
        (lambda t: t.replace("num_repeats = 2", "num_repeats = 0"), "'num_repeats' must be >= 1"),
        (lambda t: t.replace("keep_tokens = 1", 'keep_tokens = "1"'), "'keep_tokens' has a wrong value"),
        (lambda t: t.replace("[general]", "[general]\nbatch_size = 4"), "general\\]: key 'batch_size' is not"),
        (lambda t: t + "\n[[datasets]]\n", "exactly one \\[\\[datasets\\]\\]"),
        (lambda t: t.replace("[general]", '[general]\nimage_dir = "x"'), "'image_dir' is not supported in this table"),
        (lambda t: t.replace("[[datasets]]", "[[datasets]"), "cannot parse"),
    ],
    ids=["not-implemented", "unknown", "zero-repeats", "type", "general", "two-datasets", "misplaced", "syntax"],
)
def test_bad_dataset_config_names_the_key(tmp_path, edit, message):
    a, b = _folder(tmp_path, "a", 1), _folder(tmp_path, "b", 1)
    path = tmp_path / "ds.toml"
    path.write_text(edit(CONFIG.format(a=a, b=b)))
    with pytest.raises(ValueError, match=message) as err:
        read_dataset_config(path)
    assert str(path) in str(err.value)
