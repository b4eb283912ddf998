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


def _classes() -> np.ndarray:
    """Per BMP code point: 0 a word character, 1 whitespace (as ``\\s`` in ``re``: ``str.isspace``), 2 CJK
    (a unit of its own). No code point above the BMP is whitespace or in ``_CJK``'s ranges."""
    table = np.zeros(0x10000, dtype=np.uint8)
    table[[c for c in range(0x10000) if chr(c).isspace()]] = 1
    for lo, hi in re.findall(r"(.)-(.)", _CJK):
        table[ord(lo):ord(hi) + 1] = 2
    return table


_CLASS = _classes()


def split_units(text: str, max_chars: int = MAX_UNIT_CHARS) -> np.ndarray:
    """Character spans ``(start, end)`` of the units of ``text``: whitespace-free runs, CJK per character,
    runs longer than ``max_chars`` in grapheme-safe pieces (the matches of ``UNIT_RE``, found on the code
    points in numpy: on one NQ passage 40 µs against 70 µs for a loop over the regex's matches; see
    :func:`split_units_many` for many texts at once).

    >>> split_units("Hello, world!  日本").tolist()
    [[0, 6], [7, 13], [15, 16], [16, 17]]
    >>> split_units("aGVsbG8gd29ybGQ=aGVsbG8=", 10).tolist()
    [[0, 10], [10, 20], [20, 24]]
    """
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if len(cp) and cp.max() > 0xFFFF:
        cls = _CLASS[np.minimum(cp, 0xFFFF)]
        cls[cp > 0xFFFF] = 0
    else:
        cls = _CLASS[cp]
    word = np.zeros(len(cp) + 2, dtype=np.int8)
    np.equal(cls, 0, out=word[1:-1].view(np.bool_))
    edges = word[1:] - word[:-1]
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    cjk = np.flatnonzero(cls == 2)
    if len(cjk):
        starts = np.concatenate([starts, cjk])
        ends = np.concatenate([ends, cjk + 1])
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
    spans = np.stack([starts, ends], axis=1).astype(np.int64)
    long = np.flatnonzero(ends - starts > max_chars)
    if not len(long):
        return spans
    parts, prev = [], 0
    for k in long.tolist():  # long runs, in grapheme-safe pieces
        s, e = int(starts[k]), int(ends[k])
        parts.append(spans[prev:k])
        cuts = [s] + [s + end for end in grapheme_pieces(text[s:e], max_chars)]
        parts.append(np.column_stack([cuts[:-1], cuts[1:]]).astype(np.int64))
        prev = k + 1
    parts.append(spans[prev:])
    return np.concatenate(parts)


def split_units_many(texts: list[str], max_chars: int = MAX_UNIT_CHARS) -> list[np.ndarray]:
    """:func:`split_units` of each text, found in one pass over the texts joined by newlines (a newline
    ends every run, so no unit crosses texts): the per-call numpy overhead is paid once, not per text
    (a call's 20 NQ passages: 0.32 ms against 2.04 ms for the regex loop).

    >>> [u.tolist() for u in split_units_many(["Hello, world!", "", "日本 a"])]
    [[[0, 6], [7, 13]], [], [[0, 1], [1, 2], [3, 4]]]
    """
    if len(texts) > 256:  # (in parts that stay in the CPU's caches)
        return [u for k in range(0, len(texts), 256) for u in split_units_many(texts[k:k + 256], max_chars)]
    if not texts:
        return []
    spans = split_units("\n".join(texts), max_chars)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    base = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    cut = np.searchsorted(spans[:, 0], base[1:])
    return [part - b for part, b in zip(np.split(spans, cut), base.tolist())]
