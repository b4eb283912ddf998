"""Unit tier: the pure span, selection and render functions against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semtoken_rag import spans as sp
from semtoken_rag.budget import select_under_budget
from semtoken_rag.render import join_slices, kept_slices, kept_slices_many

# -- spans.local_clusters ---------------------------------------------------------------------------


@st.composite
def cluster_problem(draw):
    n = draw(st.integers(0, 24))
    seed = draw(st.integers(0, 2**16))
    # few directions, so that neighbours are often similar and spans grow
    base = torch.randn((3, 4), generator=torch.Generator().manual_seed(seed))
    pick = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    noise = draw(st.floats(0.0, 1.0))
    v = base[pick] + noise * torch.randn((n, 4), generator=torch.Generator().manual_seed(seed + 1)) \
        if n else torch.zeros((0, 4))
    breaks = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    if n:
        breaks[-1] = True
    return v, breaks, draw(st.floats(-1.0, 1.0)), draw(st.integers(1, 10))


@settings(max_examples=150, deadline=None)
@given(cluster_problem())
def test_local_clusters_is_algorithm_one(problem):
    """Each span is the longest run from its anchor whose units all have cos(anchor, unit) > tau,
    with at most max_units units and no break inside; the next span starts where it stops."""
    v, breaks, tau, max_units = problem
    before = breaks.copy()
    b = sp.local_clusters(v, breaks, tau, max_units)
    n = len(v)
    assert np.array_equal(breaks, before)
    assert b[0] == 0 and b[-1] == n and (np.diff(b) >= 1).all()
    cos = torch.nn.functional.cosine_similarity(v[:, None, :], v[None, :, :], dim=-1).numpy() if n else None
    margin = 1e-5  # float32 cosines computed two ways: skip comparisons too close to tau to call
    for s, e in itertools.pairwise(b.tolist()):
        assert e - s <= max_units
        assert not breaks[s:e - 1].any()
        for j in range(s + 1, e):
            assert cos[s, j] > tau - margin
        if e < n and e - s < max_units and not breaks[e - 1]:
            assert cos[s, e] <= tau + margin  # it stopped because the next unit is not similar enough


def test_local_clusters_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [1.0, 1.0]])
    assert sp.local_clusters(v, np.array([False] * 4 + [True]), tau=0.9, max_units=10).tolist() == [0, 2, 4, 5]
    # a break after unit 0 splits the first pair; max_units=1 gives one unit per span
    assert sp.local_clusters(v, np.array([True, False, False, False, True]), 0.9, 10).tolist() == [0, 1, 2, 4, 5]
    assert sp.local_clusters(v, np.array([False] * 4 + [True]), 0.9, 1).tolist() == [0, 1, 2, 3, 4, 5]
    assert sp.local_clusters(torch.zeros((0, 2)), np.zeros(0, dtype=bool), 0.9, 4).tolist() == [0]


# -- spans.cap_segments -----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(1, 12))
def test_cap_segments(flags, max_units):
    """Original breaks stay; each segment of length L gets exactly ceil(L / max_units) pieces, all full
    but the last."""
    breaks = np.array(flags, dtype=bool)
    breaks[-1] = True
    before = breaks.copy()
    out = sp.cap_segments(breaks, max_units)
    assert np.array_equal(breaks, before)  # input untouched
    assert out.dtype == bool and out.shape == breaks.shape
    assert (out | ~breaks).all()  # every original break kept
    for s, e in itertools.pairwise(sp.segment_bounds(breaks).tolist()):
        pieces = np.diff(np.concatenate([[s], np.flatnonzero(out[s:e]) + s + 1]))
        assert pieces.sum() == e - s
        assert len(pieces) == -(-(e - s) // max_units)
        assert (pieces[:-1] == max_units).all() and 1 <= pieces[-1] <= max_units


def test_segment_bounds():
    assert sp.segment_bounds(np.array([False, True, False, False, True])).tolist() == [0, 2, 5]
    assert sp.segment_bounds(np.array([True])).tolist() == [0, 1]


# -- budget.select_under_budget ---------------------------------------------------------------------


def total_cost(keep: np.ndarray, costs: np.ndarray, groups: np.ndarray, gap: int) -> int:
    """Independent recount: kept costs plus one gap marker between consecutive kept slices of a chunk."""
    total = int(costs[keep].sum())
    for g in np.unique(groups):
        k = keep[groups == g].astype(int)
        slices = int((np.diff(np.concatenate([[0], k])) == 1).sum())
        total += gap * max(slices - 1, 0)
    return total


def reference_greedy(scores, costs, groups, budget, gap, allowed) -> np.ndarray:
    """Best score first (ties: lower index first); keep a segment when the recounted total still fits."""
    keep = np.zeros(len(scores), dtype=bool)
    if budget < 0:
        return keep
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if not allowed[i]:
            continue
        keep[i] = True
        if total_cost(keep, costs, groups, gap) > budget:
            keep[i] = False
    return keep


@st.composite
def selection_problem(draw, max_n=8):
    n = draw(st.integers(0, max_n))
    scores = np.array(draw(st.lists(st.sampled_from([-0.5, 0.0, 0.1, 0.25, 0.5, 0.9, 1.0]) | st.floats(-1, 1),
                                    min_size=n, max_size=n)), dtype=np.float64)
    costs = np.array(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)), dtype=np.int64)
    groups = np.sort(np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=np.int64))
    allowed = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool) \
        if draw(st.booleans()) else np.ones(n, dtype=bool)
    return scores, costs, groups, draw(st.integers(-2, 60)), draw(st.integers(0, 4)), allowed


@settings(max_examples=200, deadline=None)
@given(selection_problem())
def test_selection_is_the_budgeted_greedy(problem):
    """On tiny inputs the selection equals a brute-force greedy that recounts the whole cost (gap
    markers included) at every step, so it never exceeds the budget and never keeps a forbidden one."""
    scores, costs, groups, budget, gap, allowed = problem
    args = [a.copy() for a in (scores, costs, groups, allowed)]
    keep = select_under_budget(scores, costs, groups, budget, gap, allowed)
    assert all(np.array_equal(a, b) for a, b in zip(args, (scores, costs, groups, allowed)))
    assert keep.dtype == bool and keep.shape == scores.shape
    assert np.array_equal(keep, reference_greedy(scores, costs, groups, budget, gap, allowed))
    assert total_cost(keep, costs, groups, gap) <= max(budget, 0)
    assert not (keep & ~allowed).any()


@settings(max_examples=150, deadline=None)
@given(selection_problem(max_n=10), st.floats(0.0, 2.0), st.floats(-1.0, 1.0), st.integers(0, 2**16))
def test_redundancy_aware_selection(problem, weight, threshold, seed):
    """With vectors: still within budget and allowed; with orthogonal vectors (nothing overlaps) or
    weight 0 it is the plain selection."""
    scores, costs, groups, budget, gap, allowed = problem
    n = len(scores)
    vecs = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    keep = select_under_budget(scores, costs, groups, budget, gap, allowed, vecs, weight, threshold)
    assert total_cost(keep, costs, groups, gap) <= max(budget, 0) and not (keep & ~allowed).any()
    plain = select_under_budget(scores, costs, groups, budget, gap, allowed)
    assert np.array_equal(select_under_budget(scores, costs, groups, budget, gap, allowed, vecs, 0.0,
                                              threshold), plain)
    onehot = np.eye(max(n, 1), dtype=np.float32)[:n]
    assert np.array_equal(select_under_budget(scores, costs, groups, budget, gap, allowed, onehot, weight,
                                              max(threshold, 0.0)), plain)


def test_redundancy_prefers_new_content():
    # segment 1 repeats segment 0 (same vector); segment 2 is new but scores lower than the copy
    scores, costs, groups = np.array([0.9, 0.8, 0.7]), np.array([5, 5, 5]), np.zeros(3, dtype=np.int64)
    vecs = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert select_under_budget(scores, costs, groups, 10).tolist() == [True, True, False]
    assert select_under_budget(scores, costs, groups, 10, 0, None, vecs, 1.0, 0.5).tolist() == [True, False, True]


def test_gap_markers_are_paid_and_refunded():
    costs, groups = np.array([3, 3, 3]), np.zeros(3, dtype=np.int64)
    scores = np.array([0.9, 0.1, 0.8])
    # budget 7: after 0, segment 2 would open a second slice (3 + gap 2): 8 > 7, skipped; 1 joins 0
    assert select_under_budget(scores, costs, groups, 7, 2).tolist() == [True, True, False]
    # budget 8: 0 and 2 with one gap marker fit exactly; bridging with 1 costs 3 - 2 more: 9 > 8
    assert select_under_budget(scores, costs, groups, 8, 2).tolist() == [True, False, True]
    # budget 9: 1 bridges the two slices and the gap marker is refunded
    assert select_under_budget(scores, costs, groups, 9, 2).tolist() == [True, True, True]
    # separate chunks never pay a gap between them
    assert select_under_budget(np.array([0.9, 0.8]), np.array([3, 3]), np.array([0, 1]), 6, 5).tolist() == [True, True]


# -- render.kept_slices ------------------------------------------------------------------------------


@st.composite
def units_and_mask(draw):
    n = draw(st.integers(0, 30))
    lengths = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    spaces = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    starts, pos = [], 0
    for ln, gap in zip(lengths, spaces):
        pos += gap
        starts.append(pos)
        pos += ln
    units = np.array([[s, s + ln] for s, ln in zip(starts, lengths)], dtype=np.int64).reshape(-1, 2)
    keep = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    return units, keep


@settings(max_examples=150, deadline=None)
@given(units_and_mask())
def test_kept_slices_are_the_runs_of_kept_units(problem):
    units, keep = problem
    before = units.copy(), keep.copy()
    slices = kept_slices(units, keep)
    assert np.array_equal(units, before[0]) and np.array_equal(keep, before[1])
    want, i = [], 0
    while i < len(keep):  # brute force: maximal runs of True
        if keep[i]:
            j = i
            while j + 1 < len(keep) and keep[j + 1]:
                j += 1
            want.append((int(units[i, 0]), int(units[j, 1])))
            i = j + 1
        else:
            i += 1
    assert slices == want
    assert all(isinstance(x, int) for s in slices for x in s)


@settings(max_examples=150, deadline=None)
@given(st.lists(units_and_mask(), min_size=0, max_size=6))
def test_kept_slices_many_equal_kept_slices_chunk_by_chunk(problems):
    """A call's chunks (empty ones included) in one pass: each chunk's slices as kept_slices gives them."""
    units = np.concatenate([u for u, _ in problems]) if problems else np.zeros((0, 2), dtype=np.int64)
    keep = np.concatenate([k for _, k in problems]) if problems else np.zeros(0, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum([len(k) for _, k in problems])]).astype(np.int64)
    got = kept_slices_many(units, keep, offsets)
    assert got == [kept_slices(u, k) for u, k in problems]
    assert all(type(x) is int for chunk in got for s in chunk for x in s)


def test_kept_slices_edges_and_join():
    units = np.array([[0, 3], [4, 7], [8, 13]])
    assert kept_slices(units, np.zeros(3, dtype=bool)) == []
    assert kept_slices(units, np.ones(3, dtype=bool)) == [(0, 13)]
    assert kept_slices(units, np.array([True, False, True])) == [(0, 3), (8, 13)]
    assert kept_slices(np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)) == []
    assert join_slices("one two three", [(0, 3), (8, 13)], " … ") == "one … three"
    assert join_slices("one two three", [], " … ") == ""


# -- budget.BudgetTokenizer.count_pieces ------------------------------------------------------------


@given(st.lists(st.text(min_size=1, max_size=40), max_size=30), st.integers(1, 6))
@settings(max_examples=100, deadline=None)
def test_count_pieces_equals_count_many_through_its_memo(pieces, limit):
    from semtoken_rag import budget

    tok = budget.BudgetTokenizer("llama3")
    old = budget._PIECE_MEMO
    budget._PIECE_MEMO = limit  # a tiny memo: it fills, starts over, and the counts stay right
    try:
        for _ in range(2):  # cold, then from the memo
            assert tok.count_pieces(pieces).tolist() == tok.count_many(pieces).tolist()
            assert len(tok._pieces) <= limit  # bounded, even when one call brings more new pieces
    finally:
        budget._PIECE_MEMO = old
    assert all(len(p) <= budget._PIECE_CHARS for p in tok._pieces)  # long pieces are counted, not kept


@given(st.lists(st.text(max_size=60), max_size=20), st.integers(0, 400))
@settings(max_examples=60, deadline=None)
def test_count_many_serial_and_batched_agree(texts, threshold):
    """Small inputs are counted one text after another, large ones in the tokenizer's parallel batch call:
    the same counts either way, for quicktok and for a tiktoken-style encoding alike."""
    import quicktok

    from semtoken_rag import budget

    class TiktokenLike:  # encode_ordinary / encode_ordinary_batch, as tiktoken.Encoding has them
        name = "tiktoken-like"

        def __init__(self):
            self.enc = quicktok.get_encoding("cl100k_base")

        def encode_ordinary(self, text):
            return self.enc.encode_ordinary(text)

        def encode_ordinary_batch(self, texts):
            return [self.enc.encode_ordinary(t) for t in texts]

    old = budget._SERIAL_CHARS
    try:
        for spec in ("llama3", TiktokenLike()):
            tok = budget.BudgetTokenizer(spec)
            budget._SERIAL_CHARS = 10**9
            serial = tok.count_many(texts).tolist()
            budget._SERIAL_CHARS = threshold  # some calls cross it, some not
            mixed = tok.count_many(texts).tolist()
            budget._SERIAL_CHARS = 0
            batched = tok.count_many(texts).tolist()
            assert serial == mixed == batched
            assert all(c == 0 for c, t in zip(serial, texts) if not t)
    finally:
        budget._SERIAL_CHARS = old
