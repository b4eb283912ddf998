"""benchmarks.levers: the paired counts and the table beside a full run, on hand-built results."""

from __future__ import annotations

import pytest

from benchmarks.levers import against_peers, paired


def test_paired_counts_and_sign_test():
    ref = [1, 1, 0, 0, 1, 0]
    other = [1, 0, 1, 1, 1, 1]
    plus, minus, p = paired(ref, other)
    assert (plus, minus) == (3, 1)  # plus: only `other` keeps it
    assert p == pytest.approx(0.625)
    assert paired([1, 0], [1, 0]) == (0, 0, 1.0)


def test_against_peers_joins_runs_and_aligns_questions():
    tune = {"config": {"questions": "0-2"},
            "per_variant": {"mine": {"0.5": {"hit": [1, 0, 1]}}}}
    held = {"config": {"questions": "3-4"},
            "per_variant": {"defaults": {"0.5": {"hit": [1, 1]}}}}
    # the peer ran the questions in another order, and one question more
    full = {"methods": {"rerank": {"label": "passage rerank"}, "none": {"label": "none"}},
            "per_question": {"none": {"question_index": [0], "0.5": {"hit": [1]}},
                             "rerank": {"question_index": [4, 3, 2, 1, 0, 5],
                                        "0.5": {"hit": [0, 1, 0, 1, 1, 1]}}}}
    table = against_peers([(tune, "mine"), (held, None)], full)
    rows = {r.split(" | ")[0].strip("| "): r for r in table.splitlines()[2:]}
    assert "| 5 | 0.800 |" in rows["semtoken-rag (defaults)"]
    # rerank on 0-4: hits q0=1, q1=1, q2=0, q3=1, q4=0 -> 0.600; mine 1,0,1,1,1: +2 (q2, q4) / -1 (q1)
    assert "| 5 | 0.600 | +2/−1 (1) |" in rows["passage rerank"]
    assert "none" not in rows


def test_variant_engine_varies_the_analysis_knobs_too(tiny_encoder):
    """A variant's segment cap, tau and span cap reach its per-chunk analysis (a spec of its own, kept apart
    in the shared memo); its scoring knobs reach its calls."""
    from benchmarks.levers import variant_engine
    from semtoken_rag import SemToken, SemTokenConfig

    base = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    short = variant_engine(base, {"max_segment_units": 3, "tau": 0.5, "chunk_weight": 0.0})
    assert (short._spec.max_segment_units, short._spec.tau, short.config.chunk_weight) == (3, 0.5, 0.0)
    assert short._spec.key != base._spec.key and base._spec.max_segment_units == 48
    text = ["one two three four five six seven eight nine ten eleven twelve."]
    a, b = base.compress(text, "five", rate=0.5), short.compress(text, "five", rate=0.5)
    segs = {e.breaks.sum() for e in (base.analyses._lru.get((s.key, text[0])) for s in (base._spec, short._spec))}
    assert segs == {1, 4}  # one sentence, or pieces of at most 3 words
    assert a.compressed_tokens <= a.budget and b.compressed_tokens <= b.budget
