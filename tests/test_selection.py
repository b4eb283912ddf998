"""Budgeted selection against a plain reference (the straightforward quadratic lazy greedy)."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

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
