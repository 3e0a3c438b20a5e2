"""Reliability: image files in every PIL mode, index files that are not UTF-8, long captions, blank prompt lines."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import ldm  # noqa: F401  (must precede mindspore)
from ldm.data import ImageCaptionSource, read_index
from ldm.data.transforms import load_rgb
from ldm.generate_options import GenerationError, read_prompts
from ldm.metrics.clip_score import preprocess_image
from ldm.metrics.fid import load_rgb as fid_load_rgb
from ldm.tokenizer import EOT_ID, SOT_ID, CLIPTokenizer

SIDE = 16
RAMP = np.linspace(0.0, 1.0, SIDE * SIDE).reshape(SIDE, SIDE)  # intensity 0..1 over the image


def _ramp8() -> np.ndarray:
    return np.rint(RAMP * 255).astype(np.uint8)


def _gray_rgb(gray8: np.ndarray) -> np.ndarray:
    return np.repeat(gray8[..., None], 3, axis=2)


def _palette_with_transparency() -> tuple[Image.Image, np.ndarray]:
    index = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 3).astype(np.uint8)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(colours.flatten().tolist())
    img.info["transparency"] = 0
    return img, colours[index]


def _mode_cases():
    """(mode, file suffix, image, expected 8-bit RGB): each source value scaled to 0..255 independently of PIL."""
    ramp16 = np.rint(RAMP * 65535).astype(np.uint16)
    expect_ramp = _gray_rgb(_ramp8())
    palette, palette_rgb = _palette_with_transparency()
    la = Image.merge("LA", [Image.fromarray(_ramp8()), Image.fromarray(255 - _ramp8())])
    cmyk = np.zeros((SIDE, SIDE, 4), np.uint8)
    cmyk[: SIDE // 2, :, 0] = 255  # cyan on top, white below
    cmyk_rgb = np.full((SIDE, SIDE, 3), 255, np.uint8)
    cmyk_rgb[: SIDE // 2, :, 0] = 0
    bits = RAMP > 0.5
    return [
        ("I;16", ".png", Image.fromarray(ramp16), expect_ramp),
        ("I;16B", ".tif", Image.frombytes("I;16B", (SIDE, SIDE), ramp16.astype(">u2").tobytes()), expect_ramp),
        ("I", ".tif", Image.fromarray(ramp16.astype(np.int32)), expect_ramp),
        ("F", ".tif", Image.fromarray(RAMP.astype(np.float32)), expect_ramp),
        ("P+transparency", ".png", palette, palette_rgb),
        ("LA", ".png", la, expect_ramp),
        ("CMYK", ".tif", Image.fromarray(cmyk, "CMYK"), cmyk_rgb),
        ("1", ".png", Image.fromarray(bits).convert("1"), _gray_rgb(np.where(bits, 255, 0).astype(np.uint8))),
    ]


@pytest.mark.parametrize("mode, suffix, img, expected", _mode_cases(), ids=[c[0] for c in _mode_cases()])
def test_every_pil_mode_becomes_8bit_rgb(tmp_path, mode, suffix, img, expected):
    """Defect 4: an image file in any PIL mode loads as 8-bit RGB with its full range (16-bit PNG was saturated)."""
    path = tmp_path / f"img{suffix}"
    img.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == img.mode  # the file really is in the mode under test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL palette-transparency warning either
        for loaded in (np.asarray(load_rgb(path)), fid_load_rgb(str(path))):
            assert loaded.dtype == np.uint8 and loaded.shape == (SIDE, SIDE, 3)
            assert np.abs(loaded.astype(int) - expected.astype(int)).max() <= 1, mode


def test_16bit_png_trains_on_its_pixels_not_white(tmp_path):
    """Defect 4 at the dataset level: a 16-bit gradient PNG gives pixels spread over [-1, 1], not all +1."""
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)).save(data / "ramp.png")
    (data / "img_txt.csv").write_text("dir,text\nramp.png,a ramp\n", encoding="utf-8")
    image, _ = ImageCaptionSource(data, image_size=SIDE)[0]
    assert np.mean(image >= 0.99) < 0.05 and abs(float(image.mean())) < 0.05


def test_clip_score_preprocess_scales_16bit():
    """Defect 4 in CLIP score: a 16-bit image is preprocessed like its 8-bit equivalent."""
    ramp16 = Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16))
    ramp8 = Image.fromarray(_ramp8())
    args = (8, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert np.abs(preprocess_image(ramp16, *args) - preprocess_image(ramp8, *args)).max() < 0.01


def test_out_of_range_integer_image_is_refused(tmp_path):
    """A 32-bit integer image beyond 16 bits is an error naming the range, not a silently clipped picture."""
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(path)
    with pytest.raises(ValueError, match="outside 0..65535"):
        load_rgb(path)


LATIN1 = "caf\u00e9 au lait".encode("latin-1")


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_non_utf8_caption_names_file_and_line(tmp_path, layout):
    """Defect 5: a Latin-1 caption in img_txt.csv / metadata.jsonl is an error naming the file, line and byte."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    if layout == "csv":
        index = tmp_path / "img_txt.csv"
        index.write_bytes(b"dir,text\na.png,fine\na.png," + LATIN1 + b"\n")
    else:
        index = tmp_path / "metadata.jsonl"
        index.write_bytes(
            b'{"file_name": "a.png", "text": "fine"}\n{"file_name": "a.png", "text": "' + LATIN1 + b'"}\n'
        )
    with pytest.raises(ValueError) as err:
        read_index(tmp_path)
    line = 3 if layout == "csv" else 2
    assert str(err.value).startswith(f"{index}:{line}: byte 0xe9 ")
    assert "not UTF-8" in str(err.value)


def test_utf8_bom_and_blank_lines_are_accepted(tmp_path):
    """A byte-order mark (as Excel writes) and blank lines in an index are not errors."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(
        b'\xef\xbb\xbf{"file_name": "a.png", "text": "caf\xc3\xa9"}\n\n   \n'
        + json.dumps({"file_name": "a.png", "text": "two"}).encode()
        + b"\n"
    )
    _, records = read_index(tmp_path)
    assert [r.captions for r in records] == [("caf\u00e9",), ("two",)]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_caption_longer_than_77_tokens_is_cut_keeping_end_token(family):
    """A 300-word caption becomes 77 tokens: start token, the first 75 tokens, end token (as CLIP truncates)."""
    tok = CLIPTokenizer.for_family(family)
    ids = tok(["word " * 300])[0]
    assert ids.shape == (77,) and ids[0] == SOT_ID and ids[-1] == EOT_ID
    assert list(ids[1:76]) == tok.encode("word " * 300)[:75]


def test_prompt_file_blank_lines_skipped_and_empty_file_refused(tmp_path):
    """Prompt files: blank lines are skipped; a file with none, or a non-UTF-8 one, is an error naming it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  a fox\n\n\t\nan owl  \n", encoding="utf-8")
    assert read_prompts(prompts) == ["a fox", "an owl"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\t\n", encoding="utf-8")
    with pytest.raises(GenerationError, match=f"{empty}: prompt file holds no prompts"):
        read_prompts(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\n" + LATIN1 + b"\n")
    with pytest.raises(ValueError, match=f"{latin}:2: byte 0xe9"):
        read_prompts(latin)
