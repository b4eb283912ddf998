"""Properties of the pure span, entropy and selection functions (hypothesis, hand-made arrays)."""

from __future__ import annotations

import itertools

import numpy as np
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semtoken_rag import spans as sp
from semtoken_rag.budget import select_under_budget
from semtoken_rag.render import join_slices, kept_slices
from semtoken_rag.text import MAX_UNIT_CHARS, UNIT_RE, grapheme_pieces, split_units, split_units_many


@st.composite
def selection_problem(draw):
    n = draw(st.integers(0, 40))
    scores = np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
    costs = np.array(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)), dtype=np.int64)
    groups = np.sort(np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int64))
    budget = draw(st.integers(0, 200))
    gap = draw(st.integers(0, 3))
    return scores, costs, groups, budget, gap


def total_cost(keep, costs, groups, gap):
    """Independent recount: kept costs plus one gap per extra slice of each chunk."""
    total = int(costs[keep].sum())
    for g in np.unique(groups):
        k = keep[groups == g].astype(int)
        slices = int((np.diff(np.concatenate([[0], k])) == 1).sum())
        total += gap * max(slices - 1, 0)
    return total


@given(selection_problem())
@settings(max_examples=300, deadline=None)
def test_selection_never_exceeds_budget(problem):
    scores, costs, groups, budget, gap = problem
    keep = select_under_budget(scores, costs, groups, budget, gap)
    assert keep.shape == scores.shape
    assert total_cost(keep, costs, groups, gap) <= budget


@given(selection_problem())
@settings(max_examples=200, deadline=None)
def test_selection_fills_greedily(problem):
    scores, costs, groups, budget, _ = problem
    keep = select_under_budget(scores, costs, groups, budget, 0)
    # with no gap cost, no dropped span fits in what is left: it would have fitted when its turn came
    left = budget - int(costs[keep].sum())
    for i in np.flatnonzero(~keep):
        if costs[i] <= left:
            assert False, f"span {i} (cost {costs[i]}) fits in the {left} tokens left but was dropped"


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200), st.data())
@settings(max_examples=200, deadline=None)
def test_slices_rebuild_output_in_order(text, data):
    units = split_units(text)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(units), max_size=len(units))), dtype=bool)
    slices = kept_slices(units, keep)
    # in order, non-overlapping, inside the text
    flat = [x for s in slices for x in s]
    assert flat == sorted(flat)
    assert all(0 <= s < e <= len(text) for s, e in slices)
    out = join_slices(text, slices, " … ")
    assert out == " … ".join(text[s:e] for s, e in slices)
    # every kept unit is inside the output, every dropped unit outside the slices
    for (s, e), k in zip(units.tolist(), keep):
        inside = any(a <= s and e <= b for a, b in slices)
        assert inside == bool(k)


_CJK = [(0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF)]


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_units_are_the_words(text):
    # units are the whitespace-separated words, CJK characters (written without spaces) one unit each,
    # and words longer than MAX_UNIT_CHARS cut into pieces at grapheme-cluster boundaries
    spans = split_units(text).tolist()
    words = "".join(f" {c} " if any(lo <= ord(c) <= hi for lo, hi in _CJK) else c for c in text).split()
    merged: list[str] = []
    for k, (s, e) in enumerate(spans):
        glued = k > 0 and spans[k - 1][1] == s and not _is_cjk(text[s]) and not _is_cjk(text[s - 1])
        if glued:
            merged[-1] += text[s:e]
            # the cut is a grapheme boundary of the word
            word_start = s - len(merged[-1]) + (e - s)
            assert (s - word_start) in _grapheme_ends(text[word_start:e])
        else:
            merged.append(text[s:e])
        assert e - s <= MAX_UNIT_CHARS or len(regex.findall(r"\X", text[s:e])) == 1
    assert merged == words


def split_units_regex(text: str, max_chars: int = MAX_UNIT_CHARS) -> np.ndarray:
    """The units the plain way, one ``UNIT_RE`` match at a time: the reference for the numpy finder."""
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


_ODD = st.sampled_from(["\u3000", "\x85", "\xa0", "\u2028", "\x1c", "\ud800", "\udfff", "e\u0301", "😀",
                        "👩\u200d👩\u200d👧", "日", "한", "\uffff", "\U00020000", "\n", "a" * 30])


@given(st.lists(st.one_of(st.text(max_size=40), _ODD), max_size=12).map("".join), st.integers(1, 30))
@settings(max_examples=300, deadline=None)
def test_split_units_equals_the_regex_loop(text, max_chars):
    """The numpy unit finder returns exactly the regex loop's spans (surrogates, CJK, whitespace of every
    kind, astral code points, long runs)."""
    want = split_units_regex(text, max_chars)
    got = split_units(text, max_chars)
    assert got.dtype == want.dtype == np.int64 and got.shape == want.shape and np.array_equal(got, want)


@given(st.lists(st.one_of(st.text(max_size=40), _ODD, st.sampled_from(["ΟΔΟΣ", "İ", "ß", "ǅ", "Σ."])),
                max_size=12).map("".join))
@settings(max_examples=300, deadline=None)
def test_unit_words_equal_each_word_normalised_alone(text):
    """The words of a chunk, from the text lower-cased once, are each unit's own :func:`_normal` (letters
    whose lower case is longer, a context-dependent capital sigma, surrogates)."""
    from semtoken_rag.evidence import _normal, unit_words

    units = split_units(text)
    assert unit_words(text, units) == [_normal(text[a:b]) for a, b in units.tolist()]


@given(st.lists(st.lists(st.one_of(st.text(max_size=30), _ODD), max_size=6).map("".join), max_size=600),
       st.integers(1, 30))
@settings(max_examples=100, deadline=None)
def test_split_units_many_equals_one_text_at_a_time(texts, max_chars):
    got = split_units_many(texts, max_chars)
    assert len(got) == len(texts)
    for g, t in zip(got, texts):
        assert g.shape[1:] == (2,) and np.array_equal(g, split_units_regex(t, max_chars))


def test_no_whitespace_or_cjk_above_the_bmp():
    """split_units classifies code points through a table of the BMP: none above it may be whitespace."""
    assert not any(chr(c).isspace() for c in range(0x10000, 0x110000))


def _is_cjk(c: str) -> bool:
    return any(lo <= ord(c) <= hi for lo, hi in _CJK)


def _grapheme_ends(word: str) -> set[int]:
    return {m.end() for m in regex.finditer(r"\X", word)}


def test_cjk_units():
    text = "東京は日本の首都です。 Tokyo"
    assert [text[s:e] for s, e in split_units(text).tolist()][:3] == ["東", "京", "は"]


@given(st.integers(1, 30), st.integers(1, 8), st.floats(-1, 1), st.integers(0, 10_000))
@settings(max_examples=100, deadline=None)
def test_clusters_partition_and_respect_breaks(n, max_units, tau, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((n, 6), generator=g)
    breaks = np.random.default_rng(seed).random(n) < 0.3
    breaks[-1] = True
    b = sp.local_clusters(v, breaks, tau, max_units)
    assert b[0] == 0 and b[-1] == n and (np.diff(b) >= 1).all() and (np.diff(b) <= max_units).all()
    for s, e in itertools.pairwise(b):
        assert not breaks[s:e - 1].any()  # no break inside a span
    # both ways of finding the runs (the band's readable entries, the full band as on a GPU) are
    # Algorithm 1's greedy scan, unit by unit
    assert b.tolist() == sp.local_clusters(v, breaks, tau, max_units, full_band=True).tolist() \
        == _greedy_scan(v, breaks, tau, max_units)


def _greedy_scan(v: torch.Tensor, breaks: np.ndarray, tau: float, max_units: int) -> list[int]:
    """Algorithm 1 as written: a unit joins while its cosine with the anchor exceeds tau."""
    normed = torch.nn.functional.normalize(v.float(), dim=-1)
    n, bounds, t = len(v), [0], 0
    while t < n:
        j = t + 1
        while j < n and j - t < max_units and not breaks[j - 1] and float((normed[t] * normed[j]).sum()) > tau:
            j += 1
        bounds.append(j)
        t = j
    return bounds


@given(st.integers(1, 25), st.integers(0, 10_000), st.integers(1, 7))
@settings(max_examples=100, deadline=None)
def test_chunk_stats_match_covariance_trace_and_means(n, seed, window):
    from semtoken_rag.analysis import chunk_stats, window_entropy

    rng = np.random.default_rng(seed)
    v = (rng.standard_normal((n, 5)) * 3).astype(np.float16)
    breaks = rng.random(n) < 0.3
    breaks[-1] = True
    bounds = np.unique(np.concatenate([[0, n], np.flatnonzero(rng.random(n) < 0.4)])).astype(np.int64)
    got = chunk_stats(v, bounds, breaks, window)
    x = v.astype(np.float64)

    def trace_cov(a, b):
        seg = x[a:b]
        return float(((seg - seg.mean(0)) ** 2).sum(1).mean())  # Tr(Cov), population

    segs = sp.segment_bounds(breaks)
    assert len(got.seg_entropy) == len(segs) - 1 and len(got.span_entropy) == len(bounds) - 1
    for k, (a, b) in enumerate(itertools.pairwise(segs.tolist())):
        assert abs(got.seg_entropy[k] - trace_cov(a, b)) <= 1e-4 * max(1.0, trace_cov(a, b))
        mean = x[a:b].mean(0)
        assert np.allclose(got.centroids[k], mean / max(np.linalg.norm(mean), 1e-12), atol=1e-6)
    ws, we = sp.window_ranges(bounds[:-1], bounds[1:], np.zeros(len(bounds) - 1, np.int64),
                              np.full(len(bounds) - 1, n), window)
    every = window_entropy(v, bounds, window)
    for k in range(len(bounds) - 1):
        assert abs(every[k] - trace_cov(ws[k], we[k])) <= 1e-4 * max(1.0, trace_cov(ws[k], we[k]))
        if bounds[k + 1] - bounds[k] > 1:  # selection reads the windows of spans of several units
            assert got.span_entropy[k] == every[k]
        else:
            assert np.isnan(got.span_entropy[k])
    assert np.allclose(got.centroid, x.mean(0) / max(np.linalg.norm(x.mean(0)), 1e-12), atol=1e-6)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=20), st.integers(1, 9))
def test_window_ranges_cover_span_within_chunk(lengths, width):
    starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    ends = starts + np.maximum(np.array(lengths), 1)
    lo = np.zeros_like(starts)
    hi = np.full_like(starts, int(ends.max()) + 2)
    ws, we = sp.window_ranges(starts, ends, lo, hi, width)
    assert (ws <= starts).all() and (we >= ends).all() and (ws >= lo).all() and (we <= hi).all()
    assert ((we - ws) >= np.minimum(width, hi - lo)).all()


def test_cluster_example_from_algorithm_one():
    v = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [1.0, 1.0]])
    b = sp.local_clusters(v, np.array([False, False, False, False, True]), tau=0.9, max_units=10)
    assert b.tolist() == [0, 2, 4, 5]


def _cap_costs_loop(break_after: np.ndarray, costs: np.ndarray, max_cost: int) -> np.ndarray:
    """cap_segment_costs as one loop over every unit (what the segment-wise version must equal)."""
    out = break_after.copy()
    running = 0
    for u, cost in enumerate(costs.tolist()):
        if running and running + cost > max_cost:
            out[u - 1] = True
            running = 0
        running = 0 if out[u] else running + cost
    return out


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=60), st.integers(1, 60))
@settings(max_examples=300, deadline=None)
def test_cap_segment_costs_equals_the_unit_loop(units, max_cost):
    breaks = np.array([b for b, _ in units], dtype=bool)
    costs = np.array([c for _, c in units], dtype=np.int64)
    assert sp.cap_segment_costs(breaks, costs, max_cost).tolist() == _cap_costs_loop(breaks, costs, max_cost).tolist()


def _type_hits_per_word(text: str, units: np.ndarray, kind: str, exclude: frozenset[str]) -> list[bool]:
    """evidence.type_hits as one rule per word, every word tested (what the indexed version must equal)."""
    from semtoken_rag import evidence as ev

    raws = [text[s:e] for s, e in units.tolist()]
    words = [ev._normal(r) for r in raws]
    if kind == "date":
        return [bool(w) and w not in exclude and (w in ev._MONTHS or ev._YEAR.match(w) is not None) for w in words]
    if kind == "number":
        return [bool(w) and w not in exclude and (w in ev._NUMBER_WORDS or ev._DIGITS.search(w) is not None)
                for w in words]
    starts = [True] + [r.rstrip("\"')]»”’").endswith((".", "!", "?", ":", "\n")) or not r.strip() for r in raws[:-1]]
    return [bool(w) and w not in exclude and r[:1].isupper() and not first and w not in ev._STOP
            and not w.isdigit() for r, w, first in zip(raws, words, starts)]


_WORDS = st.sampled_from(["April", "may", "1917", "1917s", "2050", "²", "٣", "twenty", "The", "Paris.", "Paris",
                          "Eiffel", "(Gustave", "IBM's", "said:", "“Quoted.”", "x", "3rd", "\n", ". ", "É", "ǅ"])


@given(st.lists(st.one_of(_WORDS, st.text(max_size=8)), max_size=40).map(" ".join),
       st.sampled_from(["date", "number", "name"]), st.sets(st.sampled_from(["paris", "1917", "april", "the"])))
@settings(max_examples=300, deadline=None)
def test_type_hits_equal_the_rule_for_each_word(text, kind, exclude):
    from semtoken_rag import evidence as ev

    units = split_units(text)
    want = _type_hits_per_word(text, units, kind, frozenset(exclude))
    assert ev.type_hits(text, units, kind, frozenset(exclude)).tolist() == want
    assert ev.type_hits(text, units, kind, frozenset(exclude), words=ev.unit_words(text, units)).tolist() == want
