"""CLIP byte-level BPE tokenizer (OpenAI CLIP vocabulary, 49,408 tokens), without torch or transformers.

Text is cleaned the OpenAI/open_clip way (ftfy, HTML unescape twice, whitespace collapse, lowercase), split by the
CLIP pre-tokenizer regex, byte-encoded and BPE-merged. A batch becomes ``int32 [B, context_length]``:
``<|startoftext|>``, the tokens, ``<|endoftext|>``, then padding; text that is too long is cut so that
``<|endoftext|>`` stays the last token.

Padding differs by family, and the text encoders see it (causal attention keeps it out of the real tokens, but the
padded positions of the context are fed to the UNet's cross-attention):

* SD1 (``FrozenCLIPEmbedder``, transformers ``CLIPTokenizer`` with ``padding="max_length"``) pads with
  ``<|endoftext|>`` (49407).
* SD2 (``FrozenOpenCLIPEmbedder``, ``open_clip.tokenize``) pads with 0, which is the token ``"!"``; diffusers' SD2
  tokenizer says the same with ``pad_token="!"``, which also makes transformers cut every "!" out as a bare id 0
  ("wow!!" -> "wow</w>", "!", "!"); we follow open_clip ("wow</w>", "!!</w>").

``CLIPTokenizer.for_family("sd1" | "sd2")`` picks the right one. The literal strings ``<|startoftext|>`` and
``<|endoftext|>`` in a text map to their special ids, as in OpenAI CLIP and transformers (open_clip spells them
``<start_of_text>``/``<end_of_text>``; both are rare in captions). transformers' SD1 tokenizer cleans with ftfy
only; ftfy already unescapes plain-text HTML entities, so only doubly escaped entities (``&amp;amp;``) or entities in
text that looks like HTML markup tokenize differently there.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from collections.abc import Sequence
from functools import lru_cache

import ftfy
import numpy as np
import regex

from ldm.atomic import write_text
from ldm.names import check_family

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # the vocabulary file holds more merges than CLIP uses
FAMILY_PAD_TOKENS = {"sd1": EOT_TOKEN, "sd2": "!"}

_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable character table: printable Latin-1 bytes map to themselves, the other 68 bytes
    to code points 256, 257, ... in byte order, so BPE never sees whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """ftfy fix, HTML unescape (twice, for doubly escaped captions), collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def load_merges(bpe_path: str | None = None) -> list[tuple[str, str]]:
    """The first ``NUM_MERGES`` merge rules of the gzip'd vocabulary file (its first line is a header)."""
    path = bpe_path or DEFAULT_BPE_PATH
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    merges = []
    for lineno, line in enumerate(lines, start=2):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}: line {lineno} is not a merge rule: {line!r}")
        merges.append((pair[0], pair[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path}: expected {NUM_MERGES} merge rules, found {len(merges)}")
    return merges


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length id arrays.

    pad_token: ``"<|endoftext|>"`` (SD1) or ``"!"`` (id 0, SD2); see :meth:`for_family`.
    """

    def __init__(self, bpe_path: str | None = None, context_length: int = 77, pad_token: str = EOT_TOKEN):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.merges = load_merges(bpe_path)
        chars = list(byte_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in self.merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        if len(self.encoder) != len(tokens) or self.encoder[EOT_TOKEN] != EOT_ID:
            raise ValueError("BPE file does not give the CLIP vocabulary (duplicate tokens or wrong size)")
        if pad_token not in self.encoder:
            raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.context_length = context_length
        self.pad_id = self.encoder[pad_token]
        self._cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}

    @classmethod
    def for_family(cls, family: str, bpe_path: str | None = None, context_length: int = 77) -> CLIPTokenizer:
        """Tokenizer with the padding of ``family``: ``"sd1"`` pads with ``<|endoftext|>``, ``"sd2"`` with 0."""
        return cls(bpe_path, context_length, FAMILY_PAD_TOKENS[check_family(family)])

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> str:
        """Space-separated BPE pieces of one pre-token (already byte-encoded); the last piece ends in ``</w>``."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = " ".join(parts)
        self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens or truncation."""
        byte_table = byte_to_unicode()
        ids = []
        for piece in _PATTERN.findall(clean_text(text)):
            word = "".join(byte_table[b] for b in piece.encode("utf-8"))  # specials are ASCII: unchanged, cached
            ids.extend(self.encoder[t] for t in self._bpe(word).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """``int32 [B, context_length]``: start token, tokens, end token (kept last when truncating), padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            out[row] = self.chunks(self.encode(text)[: self.context_length - 2])[0]
        return out

    def chunks(self, ids: Sequence[int]) -> np.ndarray:
        """``int32 [n, context_length]``: ``ids`` cut into pieces of ``context_length - 2``, each row the start
        token, its piece, the end token and padding (the long-prompt convention of the WebUI and compel); an empty
        ``ids`` gives one row, the encoding of an empty text."""
        step = self.context_length - 2
        pieces = [ids[i : i + step] for i in range(0, len(ids), step)] or [[]]
        out = np.full((len(pieces), self.context_length), self.pad_id, dtype=np.int32)
        for row, piece in enumerate(pieces):
            out[row, : len(piece) + 2] = [SOT_ID, *piece, EOT_ID]
        return out

    def save_hf_vocab(self, directory: str) -> tuple[str, str]:
        """Write transformers-style ``vocab.json`` and ``merges.txt`` for this vocabulary; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        vocab_path = os.path.join(directory, "vocab.json")
        merges_path = os.path.join(directory, "merges.txt")
        write_text(vocab_path, json.dumps(self.encoder, ensure_ascii=False))
        write_text(merges_path, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        return vocab_path, merges_path
