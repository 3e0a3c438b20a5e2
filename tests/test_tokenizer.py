"""CLIP tokenizer parity with transformers' CLIPTokenizer built from the vocab.json/merges.txt we export.

Ids are integers: every comparison is exact. transformers 5 only ships the fast (Rust) CLIPTokenizer, whose
normalizer is NFC + whitespace + lowercase without ftfy/HTML unescape (the slow one SD1 used ran ftfy first), so the
reference gets ``clean_text(text)``; the cleaning itself is checked on explicit expectations.

SD2 padding follows open_clip (zeros after the end token). The reference for it is the same transformers tokenizer with
the padded positions (attention_mask 0) set to 0, not one built with ``pad_token="!"`` as diffusers' SD2 tokenizer
is: that registers "!" as a special token and so splits "!!" into two "!" tokens, unlike open_clip.
"""

import json

import numpy as np
import pytest

from ldm.tokenizer import EOT_ID, NUM_MERGES, SOT_ID, CLIPTokenizer, clean_text

transformers = pytest.importorskip("transformers")

CORPUS = [
    "a photo of a cat",
    "Café naïve résumé façade Ångström",
    "東京タワーの夜景、美しい写真",
    "한국어 텍스트 and русский текст",
    "a dog 🐶🐕 with a party hat 🎉!!",
    "Tom &amp; Jerry &lt;3 &quot;classic&quot; &amp;amp; more",
    "MiXeD CaSe WORDS In A SeNtEnCe",
    "   lots \t of\n\n  white   space   ",
    "numbers 1234567890, 3.14159 and $99.99 (50% off!) #hashtag @user",
    "it's, they're, we've, I'm, you'll, he'd, can't, don't",
    "IT'S LOUD THEY'RE HERE",
    "“curly quotes” and ‘single’ – dashes — ellipsis… ﬁligree",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "snake_case-and.dotted/path\\back`tick~",
    "a cat <|endoftext|> after the end",
    "",
    " ",
    "x",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]
LONG = " ".join(f"word{i} and some filler," for i in range(60))


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.for_family("sd1")


@pytest.fixture(scope="module")
def hf_dir(ours, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_vocab")
    ours.save_hf_vocab(str(directory))
    return directory


def _hf_ids(hf_dir, texts, pad_id):
    tok = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    batch = tok([clean_text(t) for t in texts], padding="max_length", max_length=77, truncation=True)
    ids = np.asarray(batch["input_ids"], dtype=np.int64)
    return np.where(np.asarray(batch["attention_mask"]) == 1, ids, pad_id)


def test_known_ids(ours):
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    row = ours("a photo of a cat")[0]
    assert row.dtype == np.int32 and row.shape == (77,)
    assert row[:7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID]


def test_exported_vocab(ours, hf_dir):
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 == ours.vocab_size
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125
    assert vocab["<|startoftext|>"] == SOT_ID and vocab["<|endoftext|>"] == EOT_ID
    assert merges[0] == "#version: 0.2" and len(merges) == NUM_MERGES + 1


@pytest.mark.parametrize("family,pad_id", [("sd1", EOT_ID), ("sd2", 0)])
def test_corpus_matches_transformers(hf_dir, family, pad_id):
    ours = CLIPTokenizer.for_family(family)
    assert ours.pad_id == pad_id
    texts = CORPUS + [LONG]
    got, want = ours(texts), _hf_ids(hf_dir, texts, pad_id)
    for text, g, w in zip(texts, got, want):
        assert g.tolist() == w.tolist(), text
    empty = got[CORPUS.index("")]
    assert empty[:2].tolist() == [SOT_ID, EOT_ID] and (empty[2:] == pad_id).all()


def test_truncation_keeps_end_token(ours):
    ids = ours.encode(LONG)
    assert len(ids) > 75
    row = ours(LONG)[0]
    assert row.tolist() == [SOT_ID, *ids[:75], EOT_ID]


def test_cleaning():
    assert clean_text("  Tom &amp;amp; JERRY\n\t“hi”  ") == 'tom & jerry "hi"'
    assert clean_text("ＡＢＣ ﬁ") == "abc fi"


def test_special_token_text_and_bad_args(ours):
    assert ours.encode("a <|startoftext|> <|endoftext|>") == [320, SOT_ID, EOT_ID]
    with pytest.raises(ValueError, match="family"):
        CLIPTokenizer.for_family("sd3")
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer(pad_token="<pad>")
