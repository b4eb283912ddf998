"""Kept units -> text slices; a self-contained HTML view of what was kept (the paper's Figure 1)."""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence

import numpy as np

from .results import CompressionResult


def kept_slices(units: np.ndarray, keep: np.ndarray) -> list[tuple[int, int]]:
    """Character slices covering runs of consecutive kept units (whitespace inside a run is kept).

    >>> import numpy as np
    >>> kept_slices(np.array([[0, 3], [4, 7], [8, 9]]), np.array([True, True, False]))
    [(0, 7)]
    """
    if len(units) == 0 or not keep.any():
        return []
    k = keep.astype(np.int8)
    edges = np.diff(np.concatenate([[0], k, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return [(int(units[s, 0]), int(units[e, 1])) for s, e in zip(starts, ends)]


def kept_slices_many(units: np.ndarray, keep: np.ndarray, offsets: np.ndarray) -> list[list[tuple[int, int]]]:
    """:func:`kept_slices` of every chunk of a call in one vectorised pass: ``units`` and ``keep`` are the
    chunks' units concatenated, chunk ``i`` owning rows ``offsets[i]:offsets[i + 1]`` (no run crosses a
    chunk's end).

    >>> kept_slices_many(np.array([[0, 3], [4, 7], [0, 2], [3, 5]]), np.array([True, True, True, False]),
    ...                  np.array([0, 2, 2, 4]))
    [[(0, 7)], [], [(0, 2)]]
    """
    n, m = len(keep), len(offsets) - 1
    if n == 0 or not keep.any():
        return [[] for _ in range(m)]
    lo, hi = np.asarray(offsets[:-1]), np.asarray(offsets[1:])
    present = hi > lo
    first, last = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    first[lo[present]] = True
    last[hi[present] - 1] = True
    prev = np.concatenate([[False], keep[:-1]])
    nxt = np.concatenate([keep[1:], [False]])
    s = np.flatnonzero(keep & (first | ~prev))  # each run's first and last unit, in order
    e = np.flatnonzero(keep & (last | ~nxt))
    pairs = list(zip(units[s, 0].tolist(), units[e, 1].tolist()))
    cuts = np.searchsorted(s, offsets).tolist()
    return [pairs[cuts[i]:cuts[i + 1]] for i in range(m)]


def join_slices(text: str, slices: Sequence[tuple[int, int]], gap_marker: str) -> str:
    """The output text of a chunk: its kept slices in order, joined by ``gap_marker``.

    >>> join_slices("one two three", [(0, 3), (8, 13)], " … ")
    'one … three'
    """
    return gap_marker.join(text[s:e] for s, e in slices)


_CSS = """
body{font:15px/1.7 system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:64em;color:#1f2328;
padding:0 1em} h1{font-size:1.25em;margin:.2em 0} .meta{color:#444;margin:.3em 0 .8em}
.legend{font-size:.85em;color:#444;border:1px solid #e3e3e3;border-radius:6px;padding:.45em .8em;background:#fafafa}
.legend span.k,.legend span.dropped,.legend span.collapsed,.legend span.repeat,.legend .sw{margin-right:.2em}
.legend .item{margin-right:1.3em;white-space:nowrap} .sw{display:inline-block;width:1.1em;height:.9em;
vertical-align:-.1em;border-radius:2px}
.overview{display:flex;align-items:flex-end;gap:3px;height:64px;margin:.8em 0 .2em;padding:0 2px;
border-bottom:1px solid #ccc} .overview a{flex:1;display:flex;flex-direction:column;justify-content:flex-end;
background:#e6e6e6;min-width:6px;text-decoration:none;border-radius:2px 2px 0 0}
.overview a i{display:block;background:#1a7f37;border-radius:2px 2px 0 0} .overview a:hover{outline:1px solid #555}
.ovlabels{display:flex;gap:3px;font-size:.7em;color:#666;padding:0 2px;margin-bottom:.8em}
.ovlabels span{flex:1;text-align:center;min-width:6px}
.chunk{border:1px solid #d0d7de;border-left:4px solid #1a7f37;border-radius:6px;padding:.5em .9em .6em;margin:.7em 0}
.chunk.empty{border-left-color:#bbb;background:#fbfbfb} .chunk.empty .body{opacity:.8}
.chunk h2{font-size:.85em;font-weight:600;margin:0 0 .35em;color:#444;display:flex;align-items:center;gap:.6em;
flex-wrap:wrap} .chunk h2 .tag{font-weight:normal;color:#777}
.rel{display:inline-block;width:90px;height:.55em;background:#eee;border-radius:3px;overflow:hidden}
.rel i{display:block;height:100%;background:#0969da}
.body{white-space:pre-wrap;word-wrap:break-word}
.k{color:#000;border-bottom:2px solid #1a7f37}
.dropped{color:#8c959f}
.collapsed{color:#9a6700;font-style:italic;text-decoration:underline wavy #d4a72c}
.repeat{color:#8250df;text-decoration:line-through #8250df}
.body span[title]{border-radius:2px}
"""


def _density_colour(entropy: float, lo: float, hi: float, alpha: float = 1.0) -> str:
    t = 0.0 if hi <= lo else min(max((entropy - lo) / (hi - lo), 0.0), 1.0)
    # blue (low density, coarse) -> red (high density, fine), light enough to read text on
    r, g, b = int(200 + 55 * t), int(225 - 45 * t), int(255 - 75 * t)
    return f"rgba({r},{g},{b},{alpha:g})"


def _segments(text: str, chunk) -> list[tuple[int, int, bool, object]]:
    """Split ``text`` at span and kept-slice edges: (start, end, inside a kept slice, span or None)."""
    cuts = {0, len(text)}
    for s in chunk.spans:
        cuts.update((s.start, s.end))
    for a, b in chunk.kept_spans:
        cuts.update((a, b))
    cuts = sorted(c for c in cuts if 0 <= c <= len(text))
    kept = np.zeros(len(text) + 1, dtype=bool)
    for a, b in chunk.kept_spans:
        kept[a:b] = True
    owner: dict[int, object] = {}
    for s in chunk.spans:
        owner[s.start] = s
    out, current = [], None
    for a, b in itertools.pairwise(cuts):
        if a in owner:
            current = owner[a]
        span = current if current is not None and current.start <= a < current.end else None
        out.append((a, b, bool(kept[a]), span))
    return out


def to_html(result: CompressionResult, chunks: Sequence[str], title: str = "semtoken-rag") -> str:
    """A self-contained HTML page: each chunk with kept, collapsed, dropped and repeated spans.

    Kept text (what the LLM receives, per ``kept_spans``) is dark and underlined; dropped text is grey;
    collapsed spans (coarse, cut to their first word) are wavy; repeats of text kept elsewhere are
    struck through. Background colour shows semantic density (blue: low, red: high); each span's
    tooltip gives its status, entropy, query relevance and score. A strip at the top shows how the
    budget was spent across chunks. Needs no network or script.
    """
    entropies = [s.entropy for c in result.chunks for s in c.spans] or [0.0]
    lo, hi = float(np.percentile(entropies, 5)), float(np.percentile(entropies, 95))
    rels = [c.relevance for c in result.chunks if c.relevance is not None]
    rlo, rhi = (min(rels), max(rels)) if rels else (0.0, 1.0)
    rank = {c.index: r for r, c in enumerate(sorted(
        (c for c in result.chunks if c.relevance is not None), key=lambda c: -c.relevance), 1)}
    esc = html.escape
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>")]
    query = f"<b>{esc(result.query)}</b>" if result.query else "<i>none: density only</i>"
    kept_chunks = sum(not c.is_empty for c in result.chunks)
    parts.append(
        f"<p class='meta'>Query: {query}<br>Tokens: <b>{result.original_tokens} → {result.compressed_tokens}</b> "
        f"(budget {result.budget}; {result.ratio:.1%} kept, "
        f"{result.original_tokens / max(result.compressed_tokens, 1):.1f}x fewer) · "
        f"{kept_chunks}/{len(result.chunks)} chunks kept · {result.seconds:.2f} s</p>")
    parts.append(
        "<div class='legend'>"
        "<span class='item'><span class='k'>kept</span> sent to the LLM</span>"
        "<span class='item'><span class='dropped'>dropped</span> over budget</span>"
        "<span class='item'><span class='collapsed'>collapsed</span> coarse span cut to its first word</span>"
        "<span class='item'><span class='repeat'>repeat</span> of text kept elsewhere</span><br>"
        f"<span class='item'>semantic density: <span class='sw' style='background:{_density_colour(lo, lo, hi)}'>"
        f"</span> low … <span class='sw' style='background:{_density_colour((lo + hi) / 2, lo, hi)}'></span> "
        f"<span class='sw' style='background:{_density_colour(hi, lo, hi)}'></span> high</span>"
        "<span class='item'><span class='rel'><i style='width:100%'></i></span> chunk relevance to the query "
        "(scaled min…max)</span><span class='item'>hover a word for its scores</span></div>")
    # budget strip: one bar per chunk, height ~ original tokens, green ~ kept tokens
    top = max([c.original_tokens for c in result.chunks] or [1]) or 1
    parts.append("<div class='overview'>")
    for c in result.chunks:
        h = 64 * c.original_tokens / top
        fill = 0 if not c.original_tokens else 100 * c.compressed_tokens / c.original_tokens
        tip = f"chunk {c.index}: {c.original_tokens} → {c.compressed_tokens} tokens"
        parts.append(f"<a href='#c{c.index}' title='{esc(tip)}' style='height:{h:.0f}px'>"
                     f"<i style='height:{fill:.0f}%'></i></a>")
    parts.append("</div><div class='ovlabels'>"
                 + "".join(f"<span>{c.index}</span>" for c in result.chunks) + "</div>")
    for chunk, text in zip(result.chunks, chunks):
        head = [f"Chunk {chunk.index}", f"{chunk.original_tokens} → {chunk.compressed_tokens} tokens"
                + (f" ({chunk.compressed_tokens / chunk.original_tokens:.0%})" if chunk.original_tokens else "")]
        if chunk.relevance is not None:
            width = 100 * (chunk.relevance - rlo) / (rhi - rlo) if rhi > rlo else 100
            head.append(f"relevance {chunk.relevance:.3f} <span class='tag'>(#{rank[chunk.index]} of "
                        f"{len(rank)})</span> <span class='rel'><i style='width:{max(width, 3):.0f}%'></i></span>")
        if chunk.is_empty and text.strip():
            head.append("<span class='tag'>nothing kept</span>")
        parts.append(f"<div class='chunk{' empty' if chunk.is_empty else ''}' id='c{chunk.index}'>"
                     f"<h2>{' · '.join(head)}</h2><div class='body'>")
        if not text.strip():
            parts.append("<i class='dropped'>(empty chunk)</i>")
        for a, b, kept, span in _segments(text, chunk):
            piece = esc(text[a:b])
            if span is None:  # text between spans (whitespace), or a chunk without span detail
                parts.append(f"<span class='k'>{piece}</span>" if kept else piece)
                continue
            cls = "k" if kept else ("dropped" if span.status == "kept" else span.status)
            tip = (f"{span.status}{' (kept part)' if kept and span.status == 'collapsed' else ''}; "
                   f"entropy {span.entropy:.3f}; score {span.score:.3f}"
                   + ("" if span.relevance is None else f"; relevance {span.relevance:.3f}"))
            bg = _density_colour(span.entropy, lo, hi, 1.0 if kept else 0.45)
            parts.append(f"<span class='{cls}' title='{esc(tip)}' style='background:{bg}'>{piece}</span>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)
