"""Small text helpers shared by the peer methods: sentence splitting and budget-safe truncation."""

from __future__ import annotations

import re
from collections.abc import Callable

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace and an
# upper-case letter, digit or opening quote; a newline always ends a segment (the title line).
_SENT_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])|\n+")
_ABBREV = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Mt|No|vs|etc|Inc|Ltd|Co|U\.S|e\.g|i\.e)\.|\b[A-Z]\.)$")


def sentence_spans(text: str, split_lines: bool = True) -> list[tuple[int, int]]:
    """Character spans of sentences (stripped, non-empty), in order.

    ``split_lines=True``: a newline ends a segment, so a chunk's title line is its own span.
    ``split_lines=False``: like nltk punkt, the title runs into the first sentence.
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENT_END.finditer(text):
        if not split_lines and m.group(1) is None:
            continue
        end = m.end(1) if m.group(1) is not None else m.start()
        # don't split after common abbreviations or single initials ("J. R. R. Tolkien")
        if "\n" not in m.group(0) and _ABBREV.search(text[max(start, end - 6):end]):
            continue
        spans.append((start, end))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def split_sentences(text: str, split_lines: bool = True) -> list[str]:
    return [text[s:e] for s, e in sentence_spans(text, split_lines)]


def split_sentences_punkt_like(text: str) -> list[str]:
    """Sentences with the title line glued to the first one (what nltk punkt would return)."""
    return split_sentences(text, split_lines=False)


def join_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """Join kept spans of ``text`` in order; a newline between spans when the original gap had one."""
    parts: list[str] = []
    prev_end = None
    for s, e in sorted(spans):
        if prev_end is not None:
            parts.append("\n" if "\n" in text[prev_end:s] else " ")
        parts.append(text[s:e])
        prev_end = e
    return "".join(parts)


def truncate_tokens(text: str, max_tokens: int, counter, word_boundary: bool = False) -> str:
    """Longest prefix of ``text`` with at most ``max_tokens`` tokens (by ``counter``).

    ``word_boundary=True`` cuts back to the last whitespace so no word is split.
    """
    if max_tokens <= 0 or not text:
        return ""
    if counter(text) <= max_tokens:
        return text
    ids = counter.encode(text)
    n = max_tokens
    while n > 0:
        prefix = counter.decode(ids[:n]).rstrip("\ufffd")
        if word_boundary and len(prefix) < len(text) and not text[len(prefix)].isspace():
            cut = max(prefix.rfind(" "), prefix.rfind("\n"))
            prefix = prefix[:cut] if cut > 0 else ""
        prefix = prefix.rstrip()
        if counter(prefix) <= max_tokens:
            return prefix
        n -= 1
    return ""


def fit_greedy(items: list[tuple[float, int]], cost: Callable[[int], int], budget: int) -> list[int]:
    """Take item ids in descending score order, skipping those that no longer fit."""
    used, chosen = 0, []
    for _, i in sorted(items, key=lambda x: -x[0]):
        c = cost(i)
        if used + c <= budget:
            chosen.append(i)
            used += c
    return chosen
