"""Budgeted selection against a plain reference (the straightforward quadratic lazy greedy)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

import semtoken_rag.budget as budget_module
from semtoken_rag.budget import select_under_budget


def reference(scores, costs, groups, budget, gap_cost, allowed, vectors, weight, threshold, overheads=None):
    n = len(scores)
    keep = np.zeros(n, dtype=bool)
    kept: list[np.ndarray] = []
    heap = [(-scores[i], i) for i in range(n) if allowed[i]]
    heapq.heapify(heap)
    slices: dict[int, int] = {}
    used = 0
    while heap:
        _, i = heapq.heappop(heap)
        if weight > 0 and kept:
            overlap = float(np.max(np.stack(kept) @ vectors[i]))
            current = scores[i] - weight * max(0.0, overlap - threshold)
            if heap and current < -heap[0][0]:
                heapq.heappush(heap, (-current, i))
                continue
        g = groups
        left = i > 0 and g[i - 1] == g[i] and keep[i - 1]
        right = i + 1 < n and g[i + 1] == g[i] and keep[i + 1]
        have = slices.get(g[i], 0)
        delta = -1 if (left and right) else (0 if (left or right) else 1)
        cost = int(costs[i]) + gap_cost * (max(have + delta - 1, 0) - max(have - 1, 0))
        if have == 0 and overheads is not None:
            cost += int(overheads[g[i]])
        if used + cost <= budget:
            keep[i] = True
            used += cost
            slices[g[i]] = have + delta
            kept.append(vectors[i])
    return keep


@pytest.mark.parametrize("seed", range(40))
def test_selection_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    scores = rng.random(n)
    costs = rng.integers(0, 30, n)
    groups = np.sort(rng.integers(0, 6, n))
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    vectors[n // 2:] = vectors[: n - n // 2] + 0.1 * rng.normal(size=(n - n // 2, 16))  # near repeats
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    allowed = rng.random(n) > 0.1
    budget = int(rng.integers(0, costs.sum() + 1))
    gap = int(rng.integers(0, 4))
    overheads = rng.integers(0, 10, 6) if seed % 2 else None
    weight = float(rng.choice([0.0, 0.2, 1.0]))
    got = select_under_budget(scores, costs, groups, budget, gap, allowed, vectors, weight, 0.3, overheads)
    want = reference(scores, costs, groups, budget, gap, allowed, vectors, weight, 0.3, overheads)
    assert np.array_equal(got, want)
    runs = [k for k in range(n) if got[k] and not (k > 0 and got[k - 1] and groups[k - 1] == groups[k])]
    slices = np.bincount(groups[runs], minlength=6)
    spent = costs[got].sum() + gap * np.maximum(slices - 1, 0).sum() \
        + (0 if overheads is None else overheads[slices > 0].sum())
    assert spent <= budget


def dyadic_problem(rng, n, dim=16):
    """Vectors of +-1/4 in 16 dimensions (unit length) drawn from a small pool, and scores, weights and
    thresholds on a grid of eighths: every cosine and every penalised score is exact in float32 and
    float64 whatever the order of summation, so exact duplicates and exact ties abound and the lazy
    greedy's tie-breaking is compared exactly."""
    pool = rng.choice([-0.25, 0.25], size=(max(2, n // 4), dim)).astype(np.float32)
    vectors = pool[rng.integers(0, len(pool), n)]
    scores = rng.integers(0, 8, n) / 8
    costs = rng.integers(0, 6, n)
    groups = np.sort(rng.integers(0, 4, n))
    allowed = rng.random(n) > 0.1
    budget = int(rng.integers(0, costs.sum() + 1))
    return scores, costs, groups, budget, int(rng.integers(0, 3)), allowed, vectors


@pytest.mark.parametrize("fresh_rows", [1, 3, 128, "eager"])
@pytest.mark.parametrize("seed", range(30))
def test_exact_ties_match_reference(seed, fresh_rows, monkeypatch):
    """Duplicates and ties everywhere; the kept rows are folded into the pending ones every
    ``fresh_rows`` keeps, or each kept row is compared with all pending ones at once (eager): the masks
    equal the reference's exactly."""
    if fresh_rows == "eager":
        monkeypatch.setattr(budget_module, "_EAGER_ROWS", 1 << 30)
    else:
        monkeypatch.setattr(budget_module, "_EAGER_ROWS", 0)
        monkeypatch.setattr(budget_module, "_FRESH_ROWS", fresh_rows)
    rng = np.random.default_rng(1000 + seed)
    scores, costs, groups, budget, gap, allowed, vectors = dyadic_problem(rng, int(rng.integers(1, 200)))
    weight = float(rng.choice([0.25, 0.5, 1.0, 2.0]))
    threshold = float(rng.choice([-0.5, 0.0, 0.25, 0.5]))
    overheads = rng.integers(0, 4, 4) if seed % 2 else None
    got = select_under_budget(scores, costs, groups, budget, gap, allowed, vectors, weight, threshold, overheads)
    want = reference(scores, costs, groups, budget, gap, allowed, vectors, weight, threshold, overheads)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(10))
def test_batching_never_changes_the_mask(seed, monkeypatch):
    """Real-valued vectors with near repeats: folding after every keep, every 7 keeps or every 128, from
    a float64 copy of the vectors or without one, gives the same mask (each cosine that counts is
    computed the same way, whatever the batch)."""
    rng = np.random.default_rng(seed)
    n = 1500
    vectors = rng.normal(size=(n // 3, 24)).astype(np.float32)
    vectors = np.concatenate([vectors, vectors + 0.3 * rng.normal(size=vectors.shape),
                              vectors + 0.6 * rng.normal(size=vectors.shape)]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores, costs = rng.random(n), rng.integers(1, 20, n)
    groups, budget = np.sort(rng.integers(0, 30, n)), int(costs.sum() * rng.choice([0.2, 0.5, 0.9]))
    masks = []
    for rows, copy, eager in ((1, 1 << 22, 0), (7, 1 << 22, 0), (128, 1 << 22, 0), (7, 0, 0),  # (0: no float64
                              (128, 1 << 22, n), (128, 0, n)):  # copy; eager: each kept row at once)
        monkeypatch.setattr(budget_module, "_FRESH_ROWS", rows)
        monkeypatch.setattr(budget_module, "_EXACT_COPY_VALUES", copy)
        monkeypatch.setattr(budget_module, "_EAGER_ROWS", eager)
        masks.append(select_under_budget(scores, costs, groups, budget, 1, None, vectors, 0.5, 0.4))
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    assert masks[0].sum() > 50  # a real selection, with many folds


def test_inputs_untouched_and_checked():
    rng = np.random.default_rng(7)
    n = 300
    scores, costs, groups = rng.random(n), rng.integers(1, 9, n), np.sort(rng.integers(0, 5, n))
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    allowed = rng.random(n) > 0.2
    args = (scores, costs, groups, 400, 2, allowed, vectors)
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    select_under_budget(*args, 0.7, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip(args, copies) if isinstance(a, np.ndarray))
    with pytest.raises(ValueError, match=r"one row per segment \(300\).*\(299, 8\)"):
        select_under_budget(scores, costs, groups, 400, 2, allowed, vectors[1:], 0.7, 0.1)
    with pytest.raises(ValueError, match=r"one row per segment"):
        select_under_budget(scores, costs, groups, 400, 2, allowed, vectors[:, 0], 0.7, 0.1)


def test_non_finite_vectors_neither_take_nor_give():
    """A segment whose vector holds NaN or inf is never penalised and penalises none: the same as giving
    it a direction of its own, orthogonal to every other."""
    rng = np.random.default_rng(3)
    n = 200
    vectors = rng.normal(size=(n // 2, 6)).astype(np.float32)
    vectors = np.concatenate([vectors, vectors]) / np.linalg.norm(np.concatenate([vectors, vectors]), axis=1,
                                                                  keepdims=True)
    bad = rng.choice(n, 20, replace=False)
    broken = vectors.copy()
    broken[bad[:10], 0] = np.nan
    broken[bad[10:], 2] = np.inf
    scores, costs, groups = rng.random(n), rng.integers(1, 9, n), np.sort(rng.integers(0, 5, n))
    got = select_under_budget(scores, costs, groups, 300, 1, None, broken, 1.0, 0.3)
    # the orthogonal stand-ins would still see each other: compare with each one alone in its own axis
    alone = np.zeros((n, 6 + len(bad)), dtype=np.float32)
    alone[:, :6] = vectors
    alone[bad] = 0
    alone[bad, 6 + np.arange(len(bad))] = 1
    assert np.array_equal(got, select_under_budget(scores, costs, groups, 300, 1, None, alone, 1.0, 0.3))
    assert got.sum() > 0


def test_exact_cosines_from_the_copy_are_pair_cosines():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(60, 384)).astype(np.float32)
    overlap = budget_module._KeptOverlap(vectors, np.ones(60, bool), np.zeros(60, np.int64), 0.5)
    assert overlap.vecs64 is not None
    a, b = rng.integers(0, 60, 200), rng.integers(0, 60, 200)
    assert overlap._exact(a, b).tobytes() == budget_module.pair_cosines(vectors, a, b).tobytes()
    assert overlap._exact(a, 7).tobytes() == budget_module.pair_cosines(vectors, a, 7).tobytes()
