"""Pure span arithmetic: sentence breaks, local clustering, semantic entropy, query relevance.

Everything here works on plain tensors/arrays so that tests can call it with hand-made inputs.
Unit vectors of a whole call are concatenated (chunk after chunk); *breaks* mark where a span may
never continue (chunk and sentence ends).
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch

from .text import without_surrogates

# what the sentence segmenter leaves to us: Thai phrases (line breaks are found with str.find)
_THAI = re.compile(r"[\u0E00-\u0E7F]")
_WIDE_SPACES = re.compile(r"[^\S\x00-\x7f]")  # whitespace that is not ASCII (multi-byte in UTF-8)
_SPACE_STOP = re.compile(r"[^\S\x00-\x7f]\.")  # such a space before a full stop: see _boundaries
_THAI_END = re.compile(r"[\u0E00-\u0E7F](?=\s+[\u0E00-\u0E7F])")  # the last character before a space between two phrases


def sentence_ends(text: str, language: str = "en") -> np.ndarray:
    """Character offsets at which a sentence of ``text`` ends (its last character that is not a space):
    sentencex's rule-based segmentation for ``language`` (an ISO 639 code; about 300 languages, others fall
    back to their family's rules or to English), which knows initials ("Robert E. Lee"), abbreviations
    ("U.S. Marines", "Dr. Smith") and CJK full stops; a line break and a space between two Thai phrases end
    one too, and so does the text's end.

    >>> t = "It was won by Charles K. Kao in the U.S. in 2009. Then Dr. Smith spoke.\\nNext"
    >>> [t[i] for i in sentence_ends(t).tolist()]
    ['.', '.', '\\n', 't']
    """
    ends = []
    for b in _boundaries(language, without_surrogates(text)):  # (same length: offsets hold)
        kept = len(b["text"].rstrip())
        if kept:
            ends.append(b["start_index"] + kept - 1)
    i = text.find("\n")
    while i >= 0:  # a line break: titles, list items, paragraphs
        ends.append(i)
        i = text.find("\n", i + 1)
    if _THAI.search(text):
        ends.extend(m.start() for m in _THAI_END.finditer(text))
    return np.array(sorted(set(ends)), dtype=np.int64)


def _boundaries(language: str, text: str) -> list[dict]:
    """sentencex's sentences of ``text``. sentencex panics on a space that is not ASCII before a full stop
    (``"E\\u00a0."``; 2026-12-02): such texts go to it with every space that is not ASCII made ``" "`` (the
    same length, so offsets hold); should it panic all the same, the whole text is one sentence."""
    import sentencex  # (compiled: this function takes about 30 us for a 100-word passage)

    if _SPACE_STOP.search(text):
        text = _WIDE_SPACES.sub(" ", text)
    try:
        return sentencex.get_sentence_boundaries(language, text)
    except BaseException as e:  # (pyo3's PanicException is a BaseException)
        if type(e).__name__ != "PanicException":
            raise
        return [{"start_index": 0, "text": text}]


def sentence_break_after(text: str, units: np.ndarray, language: str = "en") -> np.ndarray:
    """``out[u]`` is True when a sentence ends at unit ``u`` of ``text`` (the last unit always does; see
    :func:`sentence_ends`).

    >>> import numpy as np
    >>> from semtoken_rag.text import split_units
    >>> t = "Title\\nIt rained. Then it stopped."
    >>> sentence_break_after(t, split_units(t)).tolist()
    [True, False, True, False, False, True]
    """
    n = len(units)
    out = np.zeros(n, dtype=bool)
    if n == 0:
        return out
    ends = sentence_ends(text, language)
    if len(ends):
        idx = np.searchsorted(units[:, 0], ends, side="right") - 1
        out[idx[idx >= 0]] = True
    out[-1] = True
    return out


def local_clusters(vectors: torch.Tensor, break_after: np.ndarray, tau: float, max_units: int, *,
                   full_band: bool | None = None, normed: torch.Tensor | None = None) -> np.ndarray:
    """Algorithm 1 (span formation): greedy runs of adjacent units similar to the run's anchor.

    A unit joins the current span while cos(anchor, unit) > ``tau``, the span has fewer than
    ``max_units`` units and no break lies between. Returns span boundaries ``b`` (spans are
    ``[b[k], b[k+1])``), ``b[0] == 0`` and ``b[-1] == n``. One O(n) scan over precomputed similarities:
    on a GPU the full band of them (``full_band``, the default there), on the CPU only those the scan
    can read. ``normed``: ``torch.nn.functional.normalize(vectors.float(), dim=-1)`` when the caller has
    it already (the same rows: a call normalises its units once for this and for maxsim).

    >>> import torch, numpy as np
    >>> v = torch.tensor([[1., 0], [1, 0.01], [0, 1], [0, 1]])
    >>> local_clusters(v, np.array([False, False, False, True]), tau=0.9, max_units=8).tolist()
    [0, 2, 4]
    """
    n = int(vectors.shape[0])
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    k = max(1, min(max_units, n))
    if normed is None:
        normed = torch.nn.functional.normalize(vectors.float(), dim=-1)
    if full_band is None:
        full_band = normed.device.type != "cpu"
    if not full_band:
        ok = _band_read(normed, break_after, tau, k) > tau  # (entries it reads are within a sentence)
    else:
        padded = torch.cat([normed, torch.zeros((k, normed.shape[1]), device=normed.device)])
        # band[i, j] = cos(unit i, unit i + j + 1), for j < k - 1
        band = torch.stack([(normed * padded[j + 1:j + 1 + n]).sum(-1) for j in range(k - 1)], dim=1) \
            if k > 1 else torch.zeros((n, 0))
        ok = band.cpu().numpy() > tau
        if ok.shape[1]:  # unit t + j + 1 joins only within the text and with no break after t .. t + j
            at = np.arange(n)[:, None] + np.arange(ok.shape[1])[None, :]
            ok &= at + 1 < n
            ok &= ~np.asarray(break_after, dtype=bool)[np.minimum(at, n - 1)]
    # run[t]: how many units a span anchored at t takes (1 + the leading columns of its row that pass)
    run = np.ones(n, dtype=np.int64)
    if ok.shape[1]:
        rows = np.flatnonzero(ok[:, 0])
        run[rows] += np.cumprod(ok[rows], axis=1).sum(axis=1)
    # the greedy scan from unit 0 steps one unit at a time except at anchors of longer runs; only those
    # are visited (a run anchored inside an earlier span is never reached)
    start = np.ones(n + 1, dtype=bool)
    reached = 0
    for t in np.flatnonzero(run > 1).tolist():
        if t >= reached:
            reached = t + int(run[t])
            start[t + 1:reached] = False
    return np.flatnonzero(start).astype(np.int64)


def _band_read(normed: torch.Tensor, break_after: np.ndarray, tau: float, k: int) -> np.ndarray:
    """The entries of the band ``band[i, j] = cos(unit i, unit i + j + 1)`` (``j < k - 1``) that the scan
    of :func:`local_clusters` can read, each computed as the full band computes it (same products, same
    per-row sums); entries it never reads are ``-inf``. The scan reads ``band[t, m]`` only when unit ``t``
    could anchor a span of ``m + 1`` units: ``t + m + 1 < n``, no break after units ``t .. t + m`` and
    ``band[t, 0 .. m - 1]`` all above ``tau``; at ``tau`` 0.9 few rows pass the first column, so this
    does a fraction of the full band's work (on the CPU, where that work is the cost).
    """
    n = int(normed.shape[0])
    band = np.full((n, max(k - 1, 0)), -np.inf, dtype=np.float32)
    brk = np.asarray(break_after, dtype=bool)
    rows = np.flatnonzero(~brk[:n - 1]) if n > 1 else np.zeros(0, dtype=np.int64)
    for m in range(k - 1):
        if len(rows) == 0:
            break
        if m == 0:  # most rows: every adjacent pair, as contiguous slices
            vals = (normed[:-1] * normed[1:]).sum(-1).numpy()[rows]
        else:
            r = torch.as_tensor(rows)
            vals = (normed.index_select(0, r) * normed.index_select(0, r + m + 1)).sum(-1).numpy()
        band[rows, m] = vals
        rows = rows[vals > tau]
        rows = rows[rows + m + 2 < n]
        rows = rows[~brk[rows + m + 1]]
    return band


def cap_segments(break_after: np.ndarray, max_units: int, soft: np.ndarray | None = None) -> np.ndarray:
    """Add breaks so that no segment is longer than ``max_units`` units. With ``soft`` (units that end a
    clause: a comma, a semicolon...), a long segment is cut after the last such unit in the second half of
    each ``max_units`` stretch, where there is one, rather than in the middle of a phrase.

    >>> cap_segments(np.array([False] * 5 + [True]), 2).tolist()
    [False, True, False, True, False, True]
    >>> cap_segments(np.array([False] * 7 + [True]), 4, soft=np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)).tolist()
    [False, False, True, False, False, False, True, True]
    """
    out = break_after.copy()
    bounds = segment_bounds(break_after)
    for s, e in itertools.pairwise(bounds):
        if e - s <= max_units:
            continue
        if soft is None:
            out[np.arange(s + max_units - 1, e - 1, max_units)] = True
            continue
        at = s
        while e - at > max_units:
            lo, hi = at + max(max_units // 2, 1), at + max_units  # a cut after unit u, u in [lo - 1, hi - 1)
            hits = np.flatnonzero(soft[lo - 1:hi - 1])
            cut = lo - 1 + int(hits[-1]) if len(hits) else hi - 1
            out[cut] = True
            at = cut + 1
    return out


def cap_segment_costs(break_after: np.ndarray, costs: np.ndarray, max_cost: int) -> np.ndarray:
    """Add breaks so that no segment of several units costs more than ``max_cost`` (a unit is never cut).

    >>> cap_segment_costs(np.array([False, False, False, True]), np.array([5, 5, 5, 5]), 10).tolist()
    [False, True, False, True]
    """
    out = break_after.copy()
    n = len(out)
    if n == 0:
        return out
    bounds = segment_bounds(break_after)
    if bounds[-1] != n:
        bounds = np.append(bounds, n)
    over = np.flatnonzero(np.add.reduceat(costs, bounds[:-1]) > max_cost)  # (bounds: 0 ... n, n > 0)
    for k in over.tolist():  # only a segment costing more than max_cost is cut, unit by unit
        a, b = int(bounds[k]), int(bounds[k + 1])
        running = 0
        for u, cost in enumerate(costs[a:b].tolist(), start=a):
            if running and running + cost > max_cost:
                out[u - 1] = True
                running = 0
            running += cost
    return out


_CLAUSE_END = frozenset(",;:—–)")


def clause_ends(text: str, units: np.ndarray) -> np.ndarray:
    """Per unit of ``text``, True when the unit ends a clause: its last character is a comma, a semicolon,
    a colon, a dash or a closing parenthesis (what :func:`cap_segments` prefers to cut after).

    >>> from semtoken_rag.text import split_units
    >>> t = "In 1901, the prize (physics) went to Röntgen; he gave it away"
    >>> clause_ends(t, split_units(t)).astype(int).tolist()
    [0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]
    """
    return np.fromiter((text[e - 1] in _CLAUSE_END for e in units[:, 1].tolist()), dtype=bool, count=len(units))


def segment_bounds(break_after: np.ndarray) -> np.ndarray:
    """Boundaries of the segments that ``break_after`` delimits (``[0, ..., n]``)."""
    return np.concatenate([[0], np.flatnonzero(break_after) + 1]).astype(np.int64)


def maxsim(query_tokens: torch.Tensor, vectors: torch.Tensor, segment_of: np.ndarray, n_segments: int, *,
           normed: torch.Tensor | None = None) -> torch.Tensor:
    """Late interaction: for each segment, the mean over query tokens of their best cosine with a unit
    (``normed``: the units' vectors L2-normalised, when the caller has them already).

    >>> import torch, numpy as np
    >>> q = torch.tensor([[1., 0], [0, 1]])
    >>> v = torch.tensor([[1., 0], [1, 0], [0, 1]])
    >>> maxsim(q, v, np.array([0, 0, 1]), 2).tolist()
    [0.5, 0.5]
    """
    normed = torch.nn.functional.normalize(vectors.float(), dim=-1) if normed is None else normed
    sims = query_tokens.to(normed.device) @ normed.T  # (t, n)
    index = torch.as_tensor(segment_of, device=normed.device).expand_as(sims)
    best = torch.full((sims.shape[0], n_segments), -1.0, device=normed.device)
    best = best.scatter_reduce(1, index, sims, reduce="amax", include_self=True)
    return best.mean(0)


def window_ranges(starts: np.ndarray, ends: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
    """The local window W_i of each span: at least ``width`` units centred on it, within ``[lo, hi)``."""
    length = ends - starts
    grow = np.maximum(width - length, 0)
    ws = np.maximum(starts - grow // 2, lo)
    we = np.minimum(np.maximum(ends + (grow - grow // 2), ws + np.minimum(width, hi - ws)), hi)
    ws = np.maximum(np.minimum(ws, we - width), lo)
    return ws, we


def normalise(x: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (all-equal input gives zeros), in the input's dtype.

    >>> normalise(np.array([2.0, 4.0, 3.0], dtype=np.float32)).tolist()
    [0.0, 1.0, 0.5]
    """
    if x.size == 0:
        return x
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)
