"""Caption rules of kohya sd-scripts: prefix/suffix, caption dropout, tag shuffle with kept tokens, tag dropout.

A caption is a comma-separated list of tags (``"sks dog, sitting, grass"``). In kohya's order: ``caption_prefix`` and
``caption_suffix`` are joined to the caption with a space; with probability ``caption_dropout_rate`` the whole
caption becomes ``""``; otherwise, when ``shuffle_caption`` or ``caption_tag_dropout_rate`` is on, the caption is
split at commas (tags stripped), the first ``keep_tokens`` tags stay in front in their order, the others are shuffled
(``shuffle_caption``) and each is then dropped with probability ``caption_tag_dropout_rate``, and the tags are joined
with ``", "``. Every draw comes from the generator passed in (the sample's own), so a resumed run makes the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaptionRules:
    """How one subset's captions are turned into training text (kohya's option names)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""

    def __post_init__(self):
        for name in ("caption_tag_dropout_rate", "caption_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")

    @property
    def varies(self) -> bool:
        """Whether one caption gives different texts at different visits besides dropout (tag shuffle/dropout)."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    def fixed(self, caption: str) -> str:
        """The caption with prefix and suffix: what a visit trains on when nothing is shuffled or dropped."""
        if self.caption_prefix:
            caption = f"{self.caption_prefix} {caption}"
        if self.caption_suffix:
            caption = f"{caption} {self.caption_suffix}"
        return caption

    def apply(self, caption: str, rng: np.random.Generator) -> str:
        """The training text of one visit: one dropout draw, then (if on) one permutation and one draw per tag."""
        caption = self.fixed(caption)
        if rng.random() < self.caption_dropout_rate:
            return ""
        if not self.varies:
            return caption
        tags = [tag.strip() for tag in caption.strip().split(",")]
        kept, flexible = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.shuffle_caption:
            flexible = [flexible[i] for i in rng.permutation(len(flexible))]
        if self.caption_tag_dropout_rate > 0:
            flexible = [t for t, u in zip(flexible, rng.random(len(flexible))) if u >= self.caption_tag_dropout_rate]
        return ", ".join(kept + flexible)
