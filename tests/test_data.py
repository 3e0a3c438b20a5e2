"""Image-caption data: layouts, transforms, tokenization, caption dropout, sharding, resume, bad files (ldm.data)."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

import ldm  # noqa: F401  (must precede mindspore)
from ldm.data import ImageCaptionSource, ImageTransform, ShardedSampler, build_dataset, read_index
from ldm.data.transforms import resize_shorter_side, to_chw_float


def stub_tokenizer(texts):
    """int32 [B, 77]: the caption's number (``"cap 7, ..."`` -> 7), -1 for an empty caption, then its length."""
    out = np.zeros((len(texts), 77), np.int32)
    for row, text in zip(out, texts):
        row[0] = int(text.split()[1].rstrip(",")) if text else -1
        row[1] = len(text)
    return out


def _image(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_csv_folder(root, rng, n=6, size=(12, 10)):
    rows = ["dir,text"]
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"imgs/{i}.{'png' if i % 2 else 'jpg'}"
        _image(rng, *size).save(root / name)
        rows.append(f'{name},"cap {i}, with a comma"')
    (root / "img_txt.csv").write_text("\n".join(rows) + "\n")
    return root


def make_jsonl_folder(root, rng, n=4):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            _image(rng, 9, 14).save(root / f"{i}.png")
            text = [f"cap {i} a", f"cap {i} b"] if i == 0 else f"cap {i}"
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return root


# ----------------------------------------------------------------------------------------------- layouts
def test_mindone_csv_layout(tmp_path, rng):
    root = make_csv_folder(tmp_path / "d", rng)
    src = ImageCaptionSource(root, image_size=8)
    assert len(src) == 6 and src.skipped == []
    image, caption = src[3]
    assert image.shape == (3, 8, 8) and image.dtype == np.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert caption == "cap 3, with a comma"  # quoted field with a comma


def test_diffusers_jsonl_layout(tmp_path, rng):
    root = make_jsonl_folder(tmp_path / "d", rng)
    index, records = read_index(root)
    assert index.endswith("metadata.jsonl") and records[0].captions == ("cap 0 a", "cap 0 b")
    src = ImageCaptionSource(root, image_size=6)
    assert src[1][0].shape == (3, 6, 6)
    assert {src.caption(e * len(src)) for e in range(40)} == {"cap 0 a", "cap 0 b"}  # one caption drawn per sample


def test_layout_errors_name_the_path(tmp_path, rng):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match=str(empty_dir)):
        read_index(empty_dir)
    both = make_csv_folder(tmp_path / "both", rng, n=1)
    (both / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="both"):
        read_index(both)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", r"img_txt\.csv: empty index file"),
        ("dir,text\n", r"img_txt\.csv: no rows"),
        ("path,caption\na.png,x\n", r"img_txt\.csv:1: header"),
        ("dir,text\na.png,x\nb.png\n", r"img_txt\.csv:3: expected 2 fields"),
        ("dir,text\n,x\n", r"img_txt\.csv:2: empty 'dir'"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, content, match):
    (tmp_path / "img_txt.csv").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_index(tmp_path)


def test_bad_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png"\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: invalid JSON"):
        read_index(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: expected an object"):
        read_index(tmp_path)


def test_corrupt_and_missing_images_are_reported_and_skipped(tmp_path, rng, caplog):
    root = make_csv_folder(tmp_path / "d", rng, n=4)
    (root / "imgs" / "1.png").write_bytes(b"not a png at all")
    with open(root / "img_txt.csv", "a") as f:
        f.write("imgs/gone.png,cap 9\n")
    with caplog.at_level(logging.WARNING, logger="ldm.data.dataset"):
        src = ImageCaptionSource(root, image_size=8)
    assert len(src) == 3
    assert [p.rsplit("/", 1)[-1] for p, _ in src.skipped] == ["1.png", "gone.png"]
    assert "skipped 2 of 5 images" in caplog.text
    assert str(root / "imgs" / "1.png") in caplog.text and "missing" in caplog.text

    for i in (0, 2, 3):
        (root / "imgs" / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(b"junk")
    with pytest.raises(ValueError, match=f"{root}: no usable images"):
        ImageCaptionSource(root)


# -------------------------------------------------------------------------------------------- transforms
def test_resize_crop_flip_and_normalisation(rng):
    img = _image(rng, 30, 20)
    assert resize_shorter_side(img, 10).size == (15, 10)  # longer side int(10 * 30 / 20)
    assert resize_shorter_side(_image(rng, 7, 11), 5).size == (5, 7)  # int(5 * 11 / 7) = 7 (truncated)

    arr = np.zeros((4, 8, 3), np.uint8)
    arr[..., 0] = np.arange(8, dtype=np.uint8)[None, :] * 36  # column ramp 0..252 in red
    arr[..., 1] = 255
    base = Image.fromarray(arr)
    out = ImageTransform(4)(base, np.random.default_rng(0))  # no resize (shorter side 4), centre crop cols 2..5
    np.testing.assert_allclose(out[0, 0], np.arange(2, 6) * 36 / 127.5 - 1, rtol=0, atol=1e-6)  # float32
    np.testing.assert_array_equal(out[1], np.ones((4, 4), np.float32))
    np.testing.assert_array_equal(out[2], -np.ones((4, 4), np.float32))
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]

    starts = set()
    flips = set()
    for seed in range(40):
        row = ImageTransform(4, random_crop=True, flip=True)(base, np.random.default_rng(seed))[0, 0]
        cols = np.round((row + 1) * 127.5 / 36).astype(int)
        flipped = cols[0] > cols[-1]
        cols = cols[::-1] if flipped else cols
        np.testing.assert_array_equal(np.diff(cols), 1)  # a contiguous window, possibly mirrored
        starts.add(int(cols[0]))
        flips.add(bool(flipped))
    assert starts == {0, 1, 2, 3, 4} and flips == {True, False}
    np.testing.assert_array_equal(to_chw_float(Image.new("RGB", (1, 1), (0, 255, 0)))[:, 0, 0], [-1, 1, -1])


def test_tokenization_and_caption_dropout(tmp_path, rng):
    root = make_csv_folder(tmp_path / "d", rng, n=4)
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return stub_tokenizer(texts)

    src = ImageCaptionSource(root, tokenizer, image_size=8, caption_dropout=0.25, seed=7)
    image, tokens = src[2]
    assert tokens.dtype == np.int32 and tokens.shape == (77,)
    assert seen[-1] in ("", "cap 2, with a comma") and tokens[0] == (2 if seen[-1] else -1)

    dropped = np.mean([src.caption(i) == "" for i in range(4000)])
    assert 0.22 < dropped < 0.28
    again = ImageCaptionSource(root, image_size=8, caption_dropout=0.25, seed=7)
    assert [src.caption(i) for i in range(50)] == [again.caption(i) for i in range(50)]  # seeded
    assert all(ImageCaptionSource(root, caption_dropout=1.0).caption(i) == "" for i in range(20))
    assert all(ImageCaptionSource(root).caption(i) for i in range(20))


# ------------------------------------------------------------------------------------- sharding / resume
@pytest.mark.parametrize("drop_last", [True, False])
def test_sharding_is_disjoint_and_covering(drop_last):
    n, world, bs = 23, 3, 2
    shards = [list(ShardedSampler(n, bs, True, 5, r, world, drop_last)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(shards[0]) == 6 and len(set(flat)) == len(flat) == 18  # disjoint, whole global batches
    else:
        assert set(flat) == set(range(n)) and len(flat) == 24  # covering; one id padded by wrapping around


def test_epochs_reshuffle_and_resume_continues_exactly():
    run = list(ShardedSampler(10, 2, True, 3, 1, 2, True, num_epochs=3))
    assert len(run) == 12
    first, second = run[:4], [i - 10 for i in run[4:8]]
    assert first != second  # a new order every epoch
    for done in (0, 1, 2, 5):
        assert list(ShardedSampler(10, 2, True, 3, 1, 2, True, num_epochs=3, batches_done=done)) == run[2 * done :]
    assert list(ShardedSampler(5, 1, False, 0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batches_done"):
        ShardedSampler(10, 2, num_epochs=1, batches_done=5)


def test_build_dataset_batches_shards_and_resumes(tmp_path, rng):
    root = make_csv_folder(tmp_path / "d", rng, n=9)
    kwargs = dict(
        image_size=8,
        batch_size=2,
        shuffle=True,
        seed=1,
        random_crop=True,
        flip=True,
        world_size=2,
        num_epochs=2,
        num_workers=1,
    )
    per_rank = []
    for r in range(2):
        ds = build_dataset(root, stub_tokenizer, rank=r, **kwargs)
        assert ds.get_dataset_size() == 4  # 2 epochs x 2 batches (8 of 9 images per epoch fill whole batches)
        batches = list(ds.create_tuple_iterator(num_epochs=1, output_numpy=True))
        image, tokens = batches[0]
        assert image.shape == (2, 3, 8, 8) and image.dtype == np.float32
        assert tokens.shape == (2, 77) and tokens.dtype == np.int32
        per_rank.append(batches)
    epoch0 = [int(t) for batches in per_rank for _, tokens in batches[:2] for t in tokens[:, 0]]
    assert len(set(epoch0)) == 8  # ranks disjoint within an epoch

    resumed = build_dataset(root, stub_tokenizer, rank=1, batches_done=3, **kwargs)
    ((image, tokens),) = list(resumed.create_tuple_iterator(num_epochs=1, output_numpy=True))
    np.testing.assert_array_equal(tokens, per_rank[1][3][1])
    np.testing.assert_array_equal(image, per_rank[1][3][0])  # same crop/flip: per-sample seeds
