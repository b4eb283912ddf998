"""Markdown structure and protected text as constraints on segments; the best window of a segment.

Pure functions over a chunk's text and its units (``(k, 2)`` character spans, see
:func:`semtoken_rag.text.split_units`):

- :func:`structure_break_after` refines sentence breaks: a markdown table row, a line of a fenced code
  block and a list item are each one segment (never cut at a "sentence end" inside them).
- :func:`fence_roles` finds fenced code blocks, so that a fence line is kept only together with its
  partner and some code of its block (:func:`balance_fences`), and fences stay balanced.
- :func:`protected_groups` marks the units a ``protect`` pattern covers; :func:`join_groups` removes
  the breaks inside such a group, so that it is one piece of one segment.
- :func:`number_hits` counts, per segment, the numbers named in the query that it holds exactly.
- :func:`best_window` is the most query-relevant run of units that fits a token budget.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})", re.MULTILINE)
_TABLE_ROW = re.compile(r"^[ \t]*\|", re.MULTILINE)
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+\S", re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_PUNCT = "\"'“”‘’()[]{}.,;:!?%$€£|"


def _lines(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each line of ``text`` (end excludes the newline)."""
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, pos + len(line)))
        pos += len(line) + 1
    return out


def _fenced_blocks(text: str) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
    """(opening fence line, closing fence line or None when the block never closes), as char ranges."""
    blocks, open_line, open_mark = [], None, ""
    for s, e in _lines(text):
        m = _FENCE.match(text, s, e)
        if m is None:
            continue
        mark = m.group(1)
        if open_line is None:
            open_line, open_mark = (s, e), mark
        elif mark[0] == open_mark[0] and len(mark) >= len(open_mark) and not text[m.end():e].strip():
            blocks.append((open_line, (s, e)))
            open_line = None
    if open_line is not None:
        blocks.append((open_line, None))
    return blocks


def _unit_range(units: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Indices ``[a, b)`` of the units that overlap characters ``[start, end)``."""
    a = int(np.searchsorted(units[:, 1], start, side="right"))
    b = int(np.searchsorted(units[:, 0], end, side="left"))
    return a, b


def structure_break_after(text: str, units: np.ndarray, break_after: np.ndarray) -> np.ndarray:
    """``break_after`` (sentence breaks) without the breaks inside a table row, a line of a fenced code
    block or a list item: each of those is one segment, ending at its line end.

    >>> from semtoken_rag.text import split_units
    >>> from semtoken_rag.spans import sentence_break_after
    >>> t = "Intro. More.\\n1. First item. Still it.\\n| 1. A | 2. B |"
    >>> u = split_units(t)
    >>> sentence_break_after(t, u).astype(int).tolist()
    [1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    >>> structure_break_after(t, u, sentence_break_after(t, u)).astype(int).tolist()
    [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    """
    out = break_after.copy()
    if len(units) == 0:
        return out
    code = np.zeros(len(text) + 1, dtype=bool)
    for (os_, _), close in _fenced_blocks(text):
        code[os_:(close[1] if close else len(text))] = True
    for s, e in _lines(text):
        if s == e:
            continue
        if code[s] or _TABLE_ROW.match(text, s, e) or _LIST_ITEM.match(text, s, e):
            a, b = _unit_range(units, s, e)
            if b - a > 1:
                out[a:b - 1] = False
    return out


def fence_roles(text: str, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the fenced block it belongs to (``-1``: none) and whether it is on a fence line.

    Units of a block that never closes (a chunk cut inside code) get block ``-1`` and are fence-line
    units all the same, so that its lone opening fence is never kept.

    >>> from semtoken_rag.text import split_units
    >>> t = "Run:\\n```sh\\nls -l\\n```\\nDone."
    >>> block, fence = fence_roles(t, split_units(t))
    >>> block.tolist(), fence.astype(int).tolist()
    ([-1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 1, 0])
    """
    block = np.full(len(units), -1, dtype=np.int64)
    fence = np.zeros(len(units), dtype=bool)
    for k, (opening, closing) in enumerate(_fenced_blocks(text)):
        a, b = _unit_range(units, *opening)
        fence[a:b] = True
        if closing is None:
            continue
        c, d = _unit_range(units, *closing)
        fence[c:d] = True
        block[a:d] = k
    return block, fence


def balance_fences(keep: np.ndarray, seg_block: np.ndarray, seg_fence: np.ndarray) -> np.ndarray:
    """Keep mask of segments with balanced fences: a fence segment stays kept only when every fence
    segment of its block is kept and so is some code of the block; a fence of no block is never kept.

    >>> balance_fences(np.array([True, True, False]), np.array([0, 0, 0]), np.array([True, False, True]))
    array([False,  True, False])
    """
    out = keep.copy()
    out[seg_fence & (seg_block < 0)] = False
    for b in np.unique(seg_block[seg_fence & (seg_block >= 0)]):
        in_block = seg_block == b
        fences, code = in_block & seg_fence, in_block & ~seg_fence
        if not (out[fences].all() and out[code].any()):
            out[fences] = False
    return out


def compile_patterns(patterns: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    """The ``protect`` regexes compiled; a bad one raises ``ValueError`` naming it.

    >>> compile_patterns([r"\\d+"])[0].pattern
    '\\\\d+'
    >>> compile_patterns(["(unclosed"])
    Traceback (most recent call last):
    ...
    ValueError: protect pattern '(unclosed' is not a valid regex: missing ), unterminated subpattern at position 0
    """
    out = []
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"protect patterns must be non-empty regex strings, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"protect pattern {p!r} is not a valid regex: {e}") from e
    return tuple(out)


def protected_groups(text: str, units: np.ndarray, patterns: Sequence[re.Pattern[str]]) -> np.ndarray:
    """Per unit, the id of the protected match covering it (``-1``: none); overlapping matches merge.

    >>> from semtoken_rag.text import split_units
    >>> t = "Mail ann@example.org or call 555 0100 today"
    >>> protected_groups(t, split_units(t), compile_patterns([r"\\S+@\\S+", r"\\d{3} \\d{4}"])).tolist()
    [-1, 0, -1, -1, 1, 1, -1]
    """
    group = np.full(len(units), -1, dtype=np.int64)
    if len(units) == 0 or not patterns:
        return group
    ranges = sorted((a, b) for a, b in (_unit_range(units, *m.span()) for p in patterns
                                        for m in p.finditer(text) if m.end() > m.start()) if b > a)
    k = -1
    last_end = -1
    for a, b in ranges:
        if a >= last_end:
            k += 1
        group[a:b] = k
        last_end = max(last_end, b)
    return group


def join_groups(break_after: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``break_after`` without breaks between two units of the same group (``-1``: no group).

    >>> join_groups(np.array([True, True, True, True]), np.array([-1, 0, 0, -1])).astype(int).tolist()
    [1, 0, 1, 1]
    """
    out = break_after.copy()
    if len(group) > 1:
        same = (group[:-1] == group[1:]) & (group[:-1] >= 0)
        out[:-1][same] = False
    return out


def query_numbers(query: str) -> frozenset[str]:
    """The specific numbers written in ``query``: years, amounts, dates, of three digits or more (one or
    two digits are mostly parts of titles, "21 Guns", "8 Mile", which dense matching already finds, and
    an exact-match bonus for them pushed title lines over answers on NQ's tuning split).

    >>> sorted(query_numbers("profit in 2021 vs 2,500.5 in 21 guns?"))
    ['2,500.5', '2021']
    """
    return frozenset(n for n in _NUMBER.findall(query) if sum(c.isdigit() for c in n) >= 3)


def number_hits(text: str, units: np.ndarray, numbers: frozenset[str]) -> np.ndarray:
    """Per unit, 1 when the unit is one of ``numbers``, surrounding punctuation aside (``"2021,"`` and
    ``"(2021)"`` are 2021; ``"20210"``, ``"21st"`` and ``"1-21"`` are not 21 nor 2021).

    >>> from semtoken_rag.text import split_units
    >>> t = "| 2020 | 1.5 |\\n| 2021 | 2.3 |\\n(2021), 20210 1-2021"
    >>> number_hits(t, split_units(t), frozenset({"2021"})).tolist()
    [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    """
    out = np.zeros(len(units), dtype=np.int64)
    if not numbers:
        return out
    for u, (s, e) in enumerate(units.tolist()):
        out[u] = text[s:e].strip(_PUNCT) in numbers
    return out


_NOT_TITLE = re.compile(r"(\||```|~~~|[-*+>]\s|\d+[.)]\s)")  # a table row, a fence, a list item, a quote


def title_units(text: str, units: np.ndarray, max_words: int) -> int:
    """How many leading units of ``text`` form its title: a first line of at most ``max_words`` words,
    not ending like a sentence (``.``, ``!``, ``?``) and not a table row, fence, list item or quote, with
    more text after it (a heading, a document
    title such as ``"Nobel Prize\\n..."``); 0 when there is none.

    >>> from semtoken_rag.text import split_units
    >>> [title_units(t, split_units(t), 8) for t in ("Nobel Prize\\nThe prize...", "It rained.\\nThen it stopped.",
    ...                                               "No newline at all", "A heading\\n", "# Setup\\n\\nRun it.",
    ...                                               "| 2018 | 1.1 |\\n| 2019 | 1.2 |", "- item\\n- item")]
    [2, 0, 0, 0, 2, 0, 0]
    """
    nl = text.find("\n")
    if nl < 0 or len(units) == 0:
        return 0
    k = int(np.searchsorted(units[:, 0], nl))
    line = text[:nl].strip()
    if not 0 < k <= max_words or k >= len(units) or line.endswith((".", "!", "?")) or _NOT_TITLE.match(line):
        return 0
    return k


def best_window(relevance: np.ndarray, costs: np.ndarray, budget: int,
                group: np.ndarray | None = None) -> tuple[int, int]:
    """The run ``[a, b)`` of units with the largest summed relevance whose summed cost fits ``budget``;
    a run never cuts a group (``group[u] >= 0``: units that stay together). ``(0, 0)`` when no unit fits.
    Ties go to the shorter, then the earlier run. Quadratic in the units: meant for one segment.

    >>> best_window(np.array([0.1, 0.9, 0.8, 0.2]), np.array([1, 1, 1, 1]), 2)
    (1, 3)
    >>> best_window(np.array([0.1, 0.9, 0.8]), np.array([1, 1, 1]), 1, group=np.array([-1, 0, 0]))
    (0, 1)
    >>> best_window(np.array([0.5]), np.array([3]), 2)
    (0, 0)
    """
    n = len(relevance)
    cum_rel = np.concatenate([[0.0], np.cumsum(np.maximum(relevance, 0.0))])
    cum_cost = np.concatenate([[0], np.cumsum(costs)])
    g = np.full(n, -1) if group is None else group
    # a run may start at u unless u continues the group of u - 1; it may end after u unless u + 1 does
    can_start = np.ones(n, dtype=bool)
    can_start[1:] = ~((g[1:] >= 0) & (g[1:] == g[:-1]))
    can_end = np.ones(n, dtype=bool)
    can_end[:-1] = can_start[1:]
    best, best_key = (0, 0), (-1.0, 0)
    for a in np.flatnonzero(can_start).tolist():
        for b in range(a + 1, n + 1):
            if cum_cost[b] - cum_cost[a] > budget:
                break
            if not can_end[b - 1]:
                continue
            key = (round(float(cum_rel[b] - cum_rel[a]), 9), -(b - a))
            if key > best_key:
                best, best_key = (a, b), key
    return best


@dataclass(frozen=True)
class CallStructure:
    """Per unit of a whole call (chunks concatenated): segment breaks with structure, protected group
    (``-1``: none; ids unique over the call), fenced block (``-1``: none), fence-line flag, and the count
    of query numbers the unit holds."""

    breaks: np.ndarray
    group: np.ndarray
    block: np.ndarray
    fence: np.ndarray
    number_hits: np.ndarray


def call_structure(chunks: Sequence[str], units: Sequence[np.ndarray], patterns: Sequence[re.Pattern[str]],
                   query: str | None) -> CallStructure:
    """:class:`CallStructure` of ``chunks`` (their units in ``units``) for ``query``.

    >>> from semtoken_rag.text import split_units
    >>> cs = ["```\\nx = 100\\n```", "Mail a@b.io now"]
    >>> s = call_structure(cs, [split_units(c) for c in cs], compile_patterns([r"\\S+@\\S+"]), "x = 100?")
    >>> s.block.tolist(), s.group.tolist(), s.number_hits.tolist()
    ([0, 0, 0, 0, 0, -1, -1, -1], [-1, -1, -1, -1, -1, -1, 0, -1], [0, 0, 0, 1, 0, 0, 0, 0])
    """
    from .spans import sentence_break_after  # same layer; kept local so that spans stays self-contained

    numbers = query_numbers(query) if query else frozenset()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("breaks", "group", "block", "fence", "hits")}
    group_base = block_base = 0
    for text, u in zip(chunks, units):
        parts["breaks"].append(structure_break_after(text, u, sentence_break_after(text, u)))
        g = protected_groups(text, u, patterns)
        parts["group"].append(np.where(g >= 0, g + group_base, -1))
        group_base += int(g.max()) + 1 if len(g) and g.max() >= 0 else 0
        b, f = fence_roles(text, u)
        parts["block"].append(np.where(b >= 0, b + block_base, -1))
        block_base += int(b.max()) + 1 if len(b) and b.max() >= 0 else 0
        parts["fence"].append(f)
        parts["hits"].append(number_hits(text, u, numbers))

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate(parts[key]).astype(dtype) if parts[key] else np.zeros(0, dtype=dtype)

    return CallStructure(cat("breaks", bool), cat("group", np.int64), cat("block", np.int64),
                         cat("fence", bool), cat("hits", np.int64))
