"""Kept units -> text slices; a self-contained HTML view of what was kept (the paper's Figure 1)."""

from __future__ import annotations

import html
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


def join_slices(text: str, slices: Sequence[tuple[int, int]], gap_marker: str) -> str:
    """The output text of a chunk: its kept slices in order, joined by ``gap_marker``.

    >>> join_slices("one two three", [(0, 3), (8, 13)], " … ")
    'one … three'
    """
    return gap_marker.join(text[s:e] for s, e in slices)


_CSS = """
body{font:15px/1.55 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.3em} .meta{color:#555} .chunk{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;
margin:.8em 0} .chunk h2{font-size:.95em;margin:0 0 .4em;color:#444}
.kept{border-bottom:2px solid #2a7} .collapsed{text-decoration:line-through wavy #c80;opacity:.75}
.dropped{opacity:.45;text-decoration:line-through} .repeat{opacity:.45;text-decoration:line-through double #a0a}
.legend span{margin-right:1.2em;padding:0 .3em} .bar{display:inline-block;height:.6em;background:#2a7;
vertical-align:middle}
"""


def _density_colour(entropy: float, lo: float, hi: float) -> str:
    t = 0.0 if hi <= lo else (entropy - lo) / (hi - lo)
    # blue (low density, coarse) -> red (high density, fine), light enough to read text on
    r, g, b = int(200 + 55 * t), int(225 - 45 * t), int(255 - 75 * t)
    return f"rgb({r},{g},{b})"


def to_html(result: CompressionResult, chunks: Sequence[str], title: str = "semtoken-rag") -> str:
    """A self-contained HTML page: each chunk with kept, collapsed, dropped and repeated spans.

    Background colour shows semantic density (blue: low, red: high); a span's tooltip gives its
    entropy, query relevance and score. Needs no network or script.
    """
    entropies = [s.entropy for c in result.chunks for s in c.spans] or [0.0]
    lo, hi = float(np.percentile(entropies, 5)), float(np.percentile(entropies, 95))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    query = html.escape(result.query) if result.query else "<i>none: density only</i>"
    parts.append(
        f"<p class='meta'>Query: <b>{query}</b><br>Tokens: {result.original_tokens} → "
        f"{result.compressed_tokens} (budget {result.budget}, kept {result.ratio:.0%}, "
        f"{result.original_tokens / max(result.compressed_tokens, 1):.1f}x fewer)</p>"
        "<p class='legend'><span class='kept'>kept</span><span class='collapsed'>collapsed</span>"
        "<span class='dropped'>dropped</span><span class='repeat'>repeat</span>"
        f"<span style='background:{_density_colour(lo, lo, hi)}'>low density</span>"
        f"<span style='background:{_density_colour(hi, lo, hi)}'>high density</span></p>")
    for chunk, text in zip(result.chunks, chunks):
        rel = "" if chunk.relevance is None else f" · relevance {chunk.relevance:.3f}"
        width = 0 if chunk.relevance is None else max(0.0, chunk.relevance) * 120
        parts.append(
            f"<div class='chunk'><h2>Chunk {chunk.index} · {chunk.original_tokens} → "
            f"{chunk.compressed_tokens} tokens{rel} <span class='bar' style='width:{width:.0f}px'></span></h2>")
        pos = 0
        for span in chunk.spans:
            parts.append(html.escape(text[pos:span.start]))
            tip = (f"{span.status}; entropy {span.entropy:.3f}; score {span.score:.3f}"
                   + ("" if span.relevance is None else f"; relevance {span.relevance:.3f}"))
            parts.append(
                f"<span class='{span.status}' title='{html.escape(tip)}' "
                f"style='background:{_density_colour(span.entropy, lo, hi)}'>"
                f"{html.escape(text[span.start:span.end])}</span>")
            pos = span.end
        parts.append(html.escape(text[pos:]) + "</div>")
    parts.append("</body></html>")
    return "".join(parts)
