"""Issue 11 point 6: a budget too small for the top-ranked segment keeps that segment's best run of words."""

from __future__ import annotations

import re

import numpy as np
import pytest

from semtoken_rag import SemToken
from semtoken_rag.structure import best_window

pytestmark = pytest.mark.slow  # the real encoder

Q = "who got the first nobel prize in physics"


def words(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize("target", [1, 3, 5, 10])
def test_tiny_budget_keeps_a_run_of_whole_words_of_the_best_chunk(engine, nobel, target):
    res = engine.compress(nobel, Q, target_tokens=target)
    assert 0 < res.compressed_tokens <= target
    kept = [c for c in res.chunks if c.text]
    assert [c.index for c in kept] == [0]  # the most relevant chunk, nothing of the others
    chunk = kept[0]
    assert len(chunk.kept_spans) == 1  # one contiguous run
    s, e = chunk.kept_spans[0]
    source = nobel[0]
    # whole words: the run starts and ends at word boundaries
    assert (s == 0 or source[s - 1].isspace()) and (e == len(source) or source[e].isspace())
    assert chunk.text == source[s:e]


def test_tiny_budget_run_is_relevant(engine, nobel):
    text = engine.compress(nobel, Q, target_tokens=5).chunks[0].text
    assert re.search(r"Nobel|Physics|first", text), text
    assert "Memorial" not in text


def test_tiny_budget_without_query_keeps_one_run(engine, nobel):
    res = engine.compress(nobel, None, target_tokens=3)
    kept = [c for c in res.chunks if c.text]
    assert res.compressed_tokens <= 3 and len(kept) == 1 and len(kept[0].kept_spans) == 1


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.33])
def test_partial_fit_stays_in_budget_and_keeps_at_least_as_much(nobel, rate):
    off = SemToken(device="cpu").compress(nobel, Q, rate=rate)
    on = SemToken(device="cpu", partial_fit=True).compress(nobel, Q, rate=rate)
    assert on.compressed_tokens <= on.budget
    assert on.compressed_tokens >= off.compressed_tokens
    for a, b in zip(off.chunks, on.chunks):  # what was kept stays kept
        for s, e in a.kept_spans:
            assert any(s2 <= s and e <= e2 for s2, e2 in b.kept_spans)
    if rate == 0.2:  # 6 tokens left over here: a run of words of the next best segment uses them
        assert on.compressed_tokens > off.compressed_tokens


def test_best_window_hand_made():
    rel = np.array([0.0, 0.2, 0.9, 0.8, 0.1, 0.7])
    assert best_window(rel, np.ones(6, int), 2) == (2, 4)
    assert best_window(rel, np.ones(6, int), 0) == (0, 0)
    assert best_window(rel, np.array([1, 1, 5, 1, 1, 1]), 3) == (3, 6)
    assert best_window(rel, np.ones(6, int), 3, group=np.array([-1, -1, -1, 0, 0, 0])) == (3, 6)
    assert best_window(rel, np.ones(6, int), 2, group=np.array([-1, -1, -1, 0, 0, 0])) == (1, 3)
