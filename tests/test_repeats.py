"""Tests for semtoken_rag.repeats: FAISS repeat search and conversation memory (real FAISS)."""

from __future__ import annotations

import numpy as np
import pytest

from semtoken_rag.repeats import ConversationMemory, find_repeats


def unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def angles(*deg: float) -> np.ndarray:
    r = np.radians(deg)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_find_repeats_basic_rules() -> None:
    x = unit([1, 0, 0], [0, 1, 0], [1, 0, 0])
    order = np.arange(3)
    assert find_repeats(x, np.array([0, 0, 1]), order, 0.95).tolist() == [-1, -1, 0]
    assert find_repeats(x, np.array([0, 0, 0]), order, 0.95).tolist() == [-1, -1, -1]  # same chunk
    # priority: span 2 is best, so span 0 is the repeat
    assert find_repeats(x, np.array([0, 0, 1]), np.array([2, 0, 1]), 0.95).tolist() == [2, -1, -1]


def test_find_repeats_threshold() -> None:
    x = angles(0, 30)  # cos = 0.866
    g, o = np.array([0, 1]), np.arange(2)
    assert find_repeats(x, g, o, 0.9).tolist() == [-1, -1]
    assert find_repeats(x, g, o, 0.85).tolist() == [-1, 0]


def test_find_repeats_chains_and_best_original() -> None:
    # 0 -- 1 (cos .966) -- 2 (cos .966), 0 -- 2 cos .866: 1 repeats 0, so 2 has no valid original
    x = angles(0, 15, 30)
    assert find_repeats(x, np.array([0, 1, 2]), np.arange(3), 0.95).tolist() == [-1, 0, -1]
    # span 3 is close to both 0 and 1 (different chunks): the more similar one is chosen
    x = angles(0, 50, 200, 45)
    assert find_repeats(x, np.array([0, 1, 2, 3]), np.arange(4), 0.9).tolist() == [-1, -1, -1, 1]


def test_find_repeats_eligibility() -> None:
    x = unit([1, 0], [1, 0], [1, 0])
    g = np.array([0, 1, 2])
    assert find_repeats(x, g, np.arange(3), 0.9, np.array([False, True, True])).tolist() == [-1, -1, 1]
    assert find_repeats(x, g, np.arange(3), 0.9, np.array([True, False, False])).tolist() == [-1, -1, -1]


def test_find_repeats_validation_and_edges() -> None:
    empty = find_repeats(np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, int), 0.9)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="permutation"):
        find_repeats(unit([1, 0], [0, 1]), np.array([0, 1]), np.array([0, 0]), 0.9)
    with pytest.raises(ValueError, match="groups must have shape"):
        find_repeats(unit([1, 0], [0, 1]), np.array([0, 1, 2]), np.array([0, 1]), 0.9)
    with pytest.raises(ValueError, match="2-D"):
        find_repeats(np.ones(3, np.float32), np.zeros(3, int), np.arange(3), 0.9)


def _reference_repeats(x: np.ndarray, groups: np.ndarray, order: np.ndarray, thr: float) -> list[int]:
    sims = x @ x.T
    out = [-1] * len(x)
    for pos, i in enumerate(order):
        cands = [j for j in order[:pos] if groups[j] != groups[i] and out[j] == -1 and sims[i, j] >= thr]
        if cands:
            out[i] = max(cands, key=lambda j: (sims[i, j], -list(order).index(j)))
    return out


def test_find_repeats_matches_brute_force() -> None:
    rng = np.random.default_rng(42)
    centers = rng.standard_normal((15, 24))
    x = centers[rng.integers(0, 15, 300)] + 0.15 * rng.standard_normal((300, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    groups, order = rng.integers(0, 12, 300), rng.permutation(300)
    got = find_repeats(x, groups, order, 0.97, use_gpu=False)
    assert (got >= 0).sum() > 20
    assert got.tolist() == _reference_repeats(x.astype(np.float64), groups, order, 0.97)
    # use_gpu=True falls back to the CPU index cleanly when faiss has no GPU support
    assert find_repeats(x, groups, order, 0.97, use_gpu=True).tolist() == got.tolist()


# ----------------------------------------------------------------------------- conversation memory


def test_conversation_memory_per_key() -> None:
    mem = ConversationMemory()
    seen = unit([1, 0, 0], [0, 1, 0])
    mem.add("alice", seen)
    probe = unit([1, 0, 0], [0, 0, 1], [0, 0.999, 0.04])
    assert mem.query("alice", probe, 0.95).tolist() == [True, False, True]
    assert mem.query("bob", probe, 0.95).tolist() == [False, False, False]
    assert "alice" in mem and "bob" not in mem and len(mem) == 1 and mem.spans("alice") == 2
    with pytest.raises(ValueError, match="dimension"):
        mem.add("alice", unit([1, 0]))
    mem.forget("alice")
    assert mem.query("alice", probe, 0.95).tolist() == [False, False, False]


def test_conversation_memory_bounds() -> None:
    mem = ConversationMemory(max_conversations=2, max_spans=3)
    eye = np.eye(8, dtype=np.float32)
    mem.add("a", eye[:1])
    mem.add("b", eye[:1])
    mem.query("a", eye[:1], 0.9)  # touch a: b is now the oldest
    mem.add("c", eye[:1])
    assert "b" not in mem and "a" in mem and "c" in mem and len(mem) == 2
    for i in range(5):
        mem.add("c", eye[i : i + 1])
    assert mem.spans("c") == 3
    assert mem.query("c", eye[:5], 0.9).tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match="max_spans"):
        ConversationMemory(max_spans=0)


def test_conversation_memory_bounded_in_bytes_over_conversations() -> None:
    d = 64
    row = 2 * d * 4  # our copy and the index's, float32
    per_conv = 512 + 10 * row  # ten spans and the per-conversation overhead
    mem = ConversationMemory(max_conversations=1000, max_spans=10_000, max_bytes=3 * per_conv + 100)
    rng = np.random.default_rng(0)
    for c in range(8):
        mem.add(f"c{c}", rng.standard_normal((10, d)).astype(np.float32))
        assert mem.nbytes <= mem.max_bytes
    assert len(mem) == 3 and mem.nbytes == 3 * per_conv
    assert [f"c{c}" in mem for c in range(8)] == [False] * 5 + [True] * 3  # least recently used go first
    assert mem.forget("c7") is True and mem.forget("c7") is False
    assert mem.nbytes == 2 * per_conv and len(mem) == 2
    mem.clear()
    assert mem.nbytes == 0 and len(mem) == 0


def test_conversation_memory_one_big_conversation_keeps_its_newest_spans() -> None:
    d = 16
    row = 2 * d * 4
    mem = ConversationMemory(max_spans=10_000, max_bytes=512 + 5 * row)
    eye = np.eye(d, dtype=np.float32)
    mem.add("big", eye[:3])
    mem.add("big", eye[3:9])  # 9 spans, room for 5: the newest five stay
    assert mem.spans("big") == 5 and mem.nbytes == 512 + 5 * row <= mem.max_bytes
    assert mem.query("big", eye[:9], 0.9).tolist() == [False] * 4 + [True] * 5
    tiny = ConversationMemory(max_bytes=100)  # not even one span fits: nothing kept, no error
    tiny.add("x", eye[:1])
    assert len(tiny) == 0 and tiny.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        ConversationMemory(max_bytes=0)


def test_conversation_memory_dimension_error_keeps_the_accounting() -> None:
    mem = ConversationMemory()
    mem.add("a", np.eye(4, dtype=np.float32)[:2])
    before = mem.nbytes
    with pytest.raises(ValueError, match="dimension"):
        mem.add("a", np.eye(3, dtype=np.float32)[:1])
    assert mem.nbytes == before and mem.spans("a") == 2


@pytest.mark.parametrize("kind", ["faiss", "torch"])
def test_memory_takes_back_what_a_cancelled_call_added(kind):
    """remove() takes out the rows one add() recorded, whatever was added after them; the rest still match."""
    from semtoken_rag.device_search import DeviceConversationMemory
    from semtoken_rag.repeats import ConversationMemory

    memory = ConversationMemory() if kind == "faiss" else DeviceConversationMemory(device="cpu")
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    second /= np.linalg.norm(second, axis=1, keepdims=True)
    epoch = memory.add("c", first)
    assert memory.add("c", second) == epoch
    before = memory.nbytes
    memory.remove("c", first, epoch)
    assert memory.spans("c") == 2 and memory.nbytes < before
    assert np.asarray(memory.query("c", np.concatenate([first, second]), 0.999)).tolist() == [False] * 3 + [True] * 2
    memory.remove("unknown", first, epoch)  # (nothing to take back)
    memory.remove("c", first, epoch)
    assert memory.spans("c") == 2
    # forgotten and started afresh by another call with equal rows: those are not the cancelled call's
    old = memory.add("d", first)
    memory.forget("d")
    memory.add("d", first)
    memory.remove("d", first, old)
    assert memory.spans("d") == 3
    # a first turn taken back leaves no conversation behind
    fresh = memory.add("e", second)
    memory.remove("e", second, fresh)
    assert "e" not in memory and memory.spans("e") == 0
