"""Text helpers shared by the method's parts: units (the words selection never splits) and surrogates.

A *unit* is a whitespace-free run of text, or one CJK character. A run longer than ``MAX_UNIT_CHARS``
(Thai, minified JSON, base64, long URLs: text without spaces) is cut into pieces of at most that many
characters at grapheme-cluster boundaries, so a surrogate pair, a base and its combining marks, or a
ZWJ emoji sequence is never split, and such text can still be compressed piece by piece.
"""

from __future__ import annotations

import re

import numpy as np
import regex  # a dependency of transformers; \X matches one extended grapheme cluster

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
UNIT_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
MAX_UNIT_CHARS = 24
_GRAPHEME = regex.compile(r"\X")
_SURROGATE = re.compile("[\ud800-\udfff]")


def without_surrogates(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) replaced by U+FFFD; same length, so offsets hold.

    >>> without_surrogates("a\\ud800b")
    'a\\ufffdb'
    """
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def grapheme_pieces(run: str, max_chars: int = MAX_UNIT_CHARS) -> list[int]:
    """End offsets of consecutive pieces of ``run``, each at most ``max_chars`` characters and made of
    whole grapheme clusters (a single cluster longer than ``max_chars`` stays whole).

    >>> grapheme_pieces("abcdefgh", 3)
    [3, 6, 8]
    >>> grapheme_pieces("e\\u0301e\\u0301e\\u0301", 3)  # never cuts an accent from its letter
    [2, 4, 6]
    """
    ends: list[int] = []
    start = pos = 0
    for m in _GRAPHEME.finditer(run):
        if m.end() - start > max_chars and pos > start:
            ends.append(pos)
            start = pos
        pos = m.end()
    if pos > start:
        ends.append(pos)
    return ends


def split_units(text: str, max_chars: int = MAX_UNIT_CHARS) -> np.ndarray:
    """Character spans ``(start, end)`` of the units of ``text``: whitespace-free runs, CJK per character,
    runs longer than ``max_chars`` in grapheme-safe pieces.

    >>> split_units("Hello, world!  日本").tolist()
    [[0, 6], [7, 13], [15, 16], [16, 17]]
    >>> split_units("aGVsbG8gd29ybGQ=aGVsbG8=", 10).tolist()
    [[0, 10], [10, 20], [20, 24]]
    """
    spans: list[tuple[int, int]] = []
    for m in UNIT_RE.finditer(text):
        s, e = m.span()
        if e - s <= max_chars:
            spans.append((s, e))
            continue
        prev = s
        for end in grapheme_pieces(text[s:e], max_chars):
            spans.append((prev, s + end))
            prev = s + end
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)
