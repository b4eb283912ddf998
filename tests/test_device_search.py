"""Exact torch search (semtoken_rag.device_search) against faiss-cpu, on random and real fingerprints."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from semtoken_rag.datasets import load_nq
from semtoken_rag.device_search import (
    DeviceConversationMemory,
    best_similarity,
    find_repeats_torch,
    range_pairs,
)
from semtoken_rag.repeats import ConversationMemory, find_repeats


def faiss_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    lims, sims, ids = index.range_search(x, radius)
    qi = np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64)))
    keep = sims >= np.float32(threshold)
    return set(zip(qi[keep].tolist(), ids[keep].tolist()))


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def real_centroids(engine) -> np.ndarray:
    """Normalised unit fingerprints of real retrieved passages (bundled NQ sample), with duplicates."""
    questions = load_nq(3)
    chunks = [c for q in questions for c in q.chunks[:8]]
    chunks += chunks[:4]  # exact repeats across "chunks": similarity 1 pairs
    fps = engine.encoder.fingerprint(chunks)
    x = torch.cat([fp.vectors for fp in fps]).float()
    return torch.nn.functional.normalize(x, dim=-1).numpy()


@pytest.mark.parametrize("seed, n, d, threshold", [(0, 300, 32, 0.3), (1, 500, 384, 0.1), (2, 64, 8, 0.7)])
def test_range_pairs_equal_faiss_on_random_data(seed, n, d, threshold):
    x = unit_rows(np.random.default_rng(seed), n, d)
    x[n // 2] = x[0]  # an exact duplicate
    i, j, s = range_pairs(torch.from_numpy(x), threshold)
    got = set(zip(i.tolist(), j.tolist()))
    want = faiss_pairs(x, threshold)
    assert len(want) > n  # the threshold lets real pairs through, not only self pairs
    assert got == want
    assert bool((s >= np.float32(threshold)).all())


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_range_pairs_equal_faiss_on_real_fingerprints(real_centroids, threshold):
    x = real_centroids
    i, j, _ = range_pairs(torch.from_numpy(x), threshold)
    got = set(zip(i.tolist(), j.tolist()))
    assert got == faiss_pairs(x, threshold)


def test_range_pairs_in_blocks_equal_one_block(monkeypatch):
    x = torch.from_numpy(unit_rows(np.random.default_rng(3), 200, 16))
    whole = range_pairs(x, 0.4)
    import semtoken_rag.device_search as ds

    monkeypatch.setattr(ds, "_BLOCK_ELEMENTS", 200 * 7)  # 7 rows a block
    blocked = range_pairs(x, 0.4)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])
    torch.testing.assert_close(whole[2], blocked[2], rtol=0, atol=1e-6)  # BLAS rounding by shape


def test_best_similarity_equals_faiss_search():
    rng = np.random.default_rng(4)
    stored, queries = unit_rows(rng, 150, 48), unit_rows(rng, 90, 48)
    index = faiss.IndexFlatIP(48)
    index.add(stored)
    want, _ = index.search(queries, 1)
    got = best_similarity(torch.from_numpy(queries), torch.from_numpy(stored)).numpy()
    np.testing.assert_allclose(got, want[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_find_repeats_torch_equals_faiss_path(real_centroids, threshold):
    x = real_centroids
    n = len(x)
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(n // 10 + 1), 10)[:n]
    order = rng.permutation(n)
    eligible = rng.random(n) > 0.1
    want = find_repeats(x, groups, order, threshold, eligible, use_gpu=False)
    got = find_repeats_torch(torch.from_numpy(x), groups, order, threshold, eligible)
    assert (want >= 0).sum() > 5  # real repeats found
    np.testing.assert_array_equal(got, want)


def test_find_repeats_torch_checks_its_input():
    x = torch.eye(3)
    with pytest.raises(ValueError, match="permutation"):
        find_repeats_torch(x, np.zeros(3), np.array([0, 0, 1]), 0.9)
    with pytest.raises(ValueError, match="groups must have shape"):
        find_repeats_torch(x, np.zeros(2), np.arange(3), 0.9)
    with pytest.raises(ValueError, match="threshold"):
        find_repeats_torch(x, np.zeros(3), np.arange(3), float("nan"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        find_repeats_torch(np.eye(3), np.zeros(3), np.arange(3), 0.9)
    assert find_repeats_torch(torch.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.9).tolist() == []


def test_device_memory_answers_like_faiss_memory(real_centroids):
    x = real_centroids
    cpu, dev = ConversationMemory(max_spans=120), DeviceConversationMemory(max_spans=120)
    for mem in (cpu, dev):
        mem.add("a", x[:100])
        mem.add("a", x[100:160])  # over max_spans: the oldest 40 go
        mem.add("b", x[200:210])
    for conv in ("a", "b", "unknown"):
        for t in (0.8, 0.95):
            np.testing.assert_array_equal(dev.query(conv, x, t), cpu.query(conv, x, t))
    assert dev.spans("a") == cpu.spans("a") == 120
    got = dev.query("a", torch.from_numpy(x), 0.95)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool
    with pytest.raises(ValueError, match="dimension"):
        dev.add("a", np.zeros((1, 3), np.float32))
    dev.forget("a")
    assert "a" not in dev and len(dev) == 1
