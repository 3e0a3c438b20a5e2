"""Prompt weighting syntax of the AUTOMATIC1111 WebUI: ``(word:1.3)``, ``(word)``, ``[word]``, nesting, escapes.

``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:w)`` multiplies it by
``w`` instead of 1.1; groups nest and multiply (``((a:1.3))`` weighs ``a`` 1.43). ``\\(``, ``\\)``, ``\\[``, ``\\]``
and ``\\\\`` stand for the literal characters. A ``:`` not followed by a number and ``)`` is text.

Where the WebUI closes unbalanced brackets silently (``(a`` weighs ``a`` 1.1), an unbalanced or crossed bracket is
an error here, naming its position: a typo should not reweight the rest of a prompt unnoticed.

Plain Python (no MindSpore), so a CLI can check prompts before the framework starts.
"""

from __future__ import annotations

import re

ATTENTION_UP = 1.1  # the WebUI's multiplier for ( ) and divisor for [ ]

_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # escaped bracket or backslash
    r"|:\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"  # ':1.3)' closes a round group with an explicit weight
    r"|[()\[\]]"
    r"|[^\\()\[\]:]+|[\\:]"  # text; a lone backslash or colon is text too
)
_CLOSER = {"(": ")", "[": "]"}


class PromptSyntaxError(ValueError):
    """A prompt's brackets do not balance; the message names the character position (1-based)."""


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` as (text, weight) fragments in order, neighbours of equal weight merged; ``[("", 1.0)]`` if empty.

    >>> parse_prompt_weights("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    pieces: list[list] = []  # [text, weight] per token of text
    open_groups: list[tuple[str, int, int]] = []  # (bracket, position, index of its first piece)
    for match in _TOKEN.finditer(prompt):
        token, pos = match.group(0), match.start() + 1
        if token in _CLOSER:
            open_groups.append((token, pos, len(pieces)))
        elif token in (")", "]") or match.group("weight") is not None:
            closing, pos = (")", match.end()) if match.group("weight") is not None else (token, pos)
            if not open_groups:
                raise PromptSyntaxError(f"prompt {prompt!r}: {closing!r} at character {pos} closes no bracket")
            opener, opened_at, first = open_groups.pop()
            if _CLOSER[opener] != closing:
                raise PromptSyntaxError(
                    f"prompt {prompt!r}: {closing!r} at character {pos} closes {opener!r} opened at character "
                    f"{opened_at}"
                )
            if match.group("weight") is not None:
                factor = float(match.group("weight"))
            else:
                factor = ATTENTION_UP if opener == "(" else 1.0 / ATTENTION_UP
            for piece in pieces[first:]:
                piece[1] *= factor
        else:
            pieces.append([token[1:] if token.startswith("\\") and len(token) == 2 else token, 1.0])
    if open_groups:
        opener, opened_at, _ = open_groups[-1]
        raise PromptSyntaxError(f"prompt {prompt!r}: {opener!r} at character {opened_at} is never closed")
    merged: list[tuple[str, float]] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def is_weighted(fragments: list[tuple[str, float]]) -> bool:
    return any(weight != 1.0 for _, weight in fragments)


__all__ = ["ATTENTION_UP", "PromptSyntaxError", "is_weighted", "parse_prompt_weights"]
