"""Cheap evidence (evidence.py): BM25 against a brute-force reference, answer types, the near-duplicate
guard, and each lever's effect inside the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag import evidence as ev
from semtoken_rag.text import split_units


def _bm25_reference(docs: list[list[str]], query: list[str], k1=1.2, b=0.75) -> list[float]:
    """Textbook BM25 (Lucene idf), one document at a time."""
    n = len(docs)
    lengths = [max(sum(1 for t in d if t), 1) for d in docs]
    avg = max(sum(lengths) / n, 1.0)
    scores = []
    for d, dl in zip(docs, lengths):
        s = 0.0
        for t in query:
            df = sum(t in x for x in docs)
            if not df:
                continue
            tf = d.count(t)
            s += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avg))
        scores.append(s)
    top = max(scores)
    return [x / top if top > 0 else 0.0 for x in scores]


@pytest.mark.parametrize("seed", range(5))
def test_lexical_scores_match_reference(seed):
    rng = np.random.default_rng(seed)
    vocab = ["nobel", "prize", "physic", "banana", "", "", "röntgen", "1901"]
    docs = [list(rng.choice(vocab, size=int(rng.integers(1, 12)))) for _ in range(int(rng.integers(1, 9)))]
    query = ["nobel", "röntgen", "absent"]
    segs = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    got = ev.lexical_scores([t for d in docs for t in d], query, segs)
    assert got == pytest.approx(_bm25_reference(docs, query))
    assert got.max() in (0.0, pytest.approx(1.0))


def test_terms_stem_and_drop_stop_words():
    text = "Who received the Prizes? Röntgen received them in 1901."
    assert ev.query_terms("who received the prizes") == ["receiv", "prize"]
    assert [t for t in ev.unit_terms(text, split_units(text)) if t] == ["receiv", "prize", "röntgen", "receiv", "1901"]


@settings(max_examples=150, deadline=None)
@given(hst.lists(hst.text(alphabet=hst.characters(categories=("L", "N", "P", "Zs")), max_size=12), max_size=40),
       hst.integers(min_value=1, max_value=8))
def test_word_term_codes_equal_the_terms_codes_through_the_memo(words, memo_max):
    """The memoised codes are those of the stemmed terms, for new and known words, stop words and empty
    words, and when the memo starts afresh (a small bound, so it fills within one call)."""
    words = words + ["the", "", "Prizes".lower(), "röntgen"] + words[:3]
    text = " ".join(w or "x" for w in words)
    want = ev.term_codes(ev.unit_terms(text, np.zeros((0, 2), np.int64), words)).tolist()
    saved = dict(ev._CODE_MEMO)
    old = ev._CODE_MEMO_MAX
    try:
        ev._CODE_MEMO_MAX = memo_max
        ev._CODE_MEMO.clear()
        assert ev.word_term_codes(words).tolist() == want  # some new, then some known
        assert ev.word_term_codes(words).tolist() == want
        assert len(ev._CODE_MEMO) <= memo_max  # bounded, even when one call brings more new words
    finally:
        ev._CODE_MEMO_MAX = old
        ev._CODE_MEMO.clear()
        ev._CODE_MEMO.update(saved)


@pytest.mark.parametrize(("query", "kind"), [
    ("when was the first nobel prize awarded", "date"),
    ("what year did the titanic sink", "date"),
    ("in which year did the war end", "date"),
    ("how many moons does jupiter have", "number"),
    ("how much does an elephant weigh", "number"),
    ("who wrote the declaration of independence", "name"),
    ("in the film jaws, who played the shark hunter", "name"),
    ("where is the eiffel tower", None),
    ("what is the capital of france", None),
    ("", None),
])
def test_answer_type(query, kind):
    assert ev.answer_type(query) == kind


def test_type_hits_skip_query_words_and_sentence_starts():
    text = "Jaws was directed by Steven Spielberg in 1975. Robert Shaw played Quint."
    units = split_units(text)
    words = [text[s:e] for s, e in units.tolist()]
    names = [w for w, h in zip(words, ev.type_hits(text, units, "name", frozenset({"jaws"}))) if h]
    assert names == ["Steven", "Spielberg", "Shaw", "Quint."]  # "Jaws" and "Robert" start sentences
    assert [w for w, h in zip(words, ev.type_hits(text, units, "date")) if h] == ["1975."]
    assert not ev.type_hits(text, units, None).any()


def test_query_words_match_candidates_whatever_the_punctuation():
    text = "Robert Shaw played Quint in Jaws, directed by Steven Spielberg."
    units = split_units(text)
    words = [text[s:e] for s, e in units.tolist()]
    query = "who played Quint in 'Jaws'?"
    names = [w for w, h in zip(words, ev.type_hits(text, units, "name", ev.query_words(query))) if h]
    assert names == ["Shaw", "Steven", "Spielberg."]  # "Quint" and "Jaws," are the question's own words
    raw = frozenset(w.lower() for w in query.split())  # punctuation kept: "'jaws'?" never meets "jaws"
    assert "Jaws," in [w for w, h in zip(words, ev.type_hits(text, units, "name", raw)) if h]


def test_near_duplicate_guard_rule():
    def new(a, b):
        return ev.carries_new_facts(a, split_units(a), b, split_units(b))

    assert new("Paid 2,500 dollars in 1999.", "Paid 2,400 dollars in 1999.")
    assert not new("the war ended in november.", "The war ended in November.")  # nothing capitalised or numeric new
    assert new("Marie Curie won.", "Pierre Curie won.")


OFF = {"lexical_weight": 0.0, "answer_type_weight": 0.0, "neighbour_weight": 0.0, "keep_titles": False,
       "repeat_guard": False}  # every lever off: the baseline each test compares against

CHUNKS = [
    "Alpha beta gamma delta epsilon. Zeta eta theta iota kappa. Lambda mu nu xi omicron.",
    "Pi rho sigma tau upsilon. Phi chi psi omega Quokkaville. Alpha beta gamma delta epsilon.",
]


def test_lexical_weight_keeps_the_exact_word(tiny_encoder):
    """With random weights the encoder's matching is noise; a large lexical weight must then keep the one
    sentence that holds the query's rare word, at a budget that fits about one sentence."""
    query = "where is quokkaville"
    base = SemTokenConfig(encoder=str(tiny_encoder), device="cpu", chunk_weight=0.0, dedup=False, **OFF)
    target = SemToken(base).count_tokens("Phi chi psi omega Quokkaville.") + 1
    off = SemToken(base).compress(CHUNKS, query, target_tokens=target)
    got = SemToken(base.model_copy(update={"lexical_weight": 10.0})).compress(CHUNKS, query, target_tokens=target)
    assert "Quokkaville" not in off.chunks[1].text  # the random encoder alone picks another sentence
    assert "Quokkaville" in got.chunks[1].text
    assert got.compressed_tokens <= got.budget


def test_chunk_lexical_weight_spends_the_budget_on_the_chunk_with_the_words(tiny_encoder):
    chunks = ["Alpha beta gamma delta epsilon. Zeta eta theta iota kappa.",
              "Pi rho sigma tau. Quokka habitats span Rottnest island.", "", "Lambda mu nu xi omicron."]
    query = "quokka rottnest habitats"
    base = SemTokenConfig(encoder=str(tiny_encoder), device="cpu", chunk_weight=0.0, dedup=False, **OFF)
    target = SemToken(base).count_tokens("Pi rho sigma tau.") + 1
    got = SemToken(base.model_copy(update={"chunk_lexical_weight": 10.0})).compress(chunks, query,
                                                                                   target_tokens=target)
    assert got.chunks[1].text and not got.chunks[0].text and not got.chunks[3].text  # only the chunk with the words
    assert got.chunks[2].text == "" and got.compressed_tokens <= got.budget  # an empty chunk is no document


def test_answer_type_weight_prefers_a_year(tiny_encoder):
    chunks = ["Bob went home early. Alice stayed inside. Crowds cheered in 1932."]
    base = SemTokenConfig(encoder=str(tiny_encoder), device="cpu", chunk_weight=0.0, dedup=False, **OFF)
    eng = SemToken(base.model_copy(update={"answer_type_weight": 10.0}))
    target = eng.count_tokens("Crowds cheered in 1932.") + 1
    off = SemToken(base).compress(chunks, "when did it happen", target_tokens=target)
    got = eng.compress(chunks, "when did it happen", target_tokens=target)
    assert "1932" not in off.chunks[0].text
    assert "1932" in got.chunks[0].text
    assert isinstance(got.cache_hits, int) and got.cache_hits == 0  # a fresh engine; not the lever's hits


def test_neighbour_best_stays_in_chunk():
    from semtoken_rag.engine import _neighbour_best

    rel = np.array([0.1, 0.9, 0.2, 0.5, 0.3], dtype=np.float32)
    got = _neighbour_best(rel, np.array([0, 0, 0, 1, 2]))
    assert got.tolist() == pytest.approx([0.9, 0.2, 0.9, 0.5, 0.3])  # lone segments inherit themselves


def test_repeat_guard_keeps_a_near_repeat_with_a_new_fact(tiny_encoder):
    """The same sentence in two chunks with one number changed: without the guard the worse-ranked copy
    is a repeat (identical words give near-identical fingerprints), with it the copy is not; an exact
    copy stays a repeat either way."""
    chunks = ["The company paid 2,500 dollars in taxes that year to the state.",
              "The company paid 2,400 dollars in taxes that year to the state.",
              "The company paid 2,500 dollars in taxes that year to the state."]
    cfg = SemTokenConfig(encoder=str(tiny_encoder), device="cpu", min_repeat_units=2, **OFF)

    def repeats(c):
        res = SemToken(c).compress(chunks, "what did the company pay", rate=1 / 3)
        return [any(s.status == "repeat" for s in ch.spans) for ch in res.chunks]

    off, on = repeats(cfg), repeats(cfg.model_copy(update={"repeat_guard": True}))
    assert off[1] and not on[1]
    assert off[0] + off[2] == on[0] + on[2] == 1  # one of the two exact copies, either way
