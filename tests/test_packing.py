"""Queries riding in the padding of the chunks' rows (Encoder.encode), and the chunk statistics computed
for many chunks at once (analysis.chunk_stats_many): both must give exactly what the one-at-a-time paths
give. Unit tier: the tiny random-weight BERT (32-token windows); one slow test on the real encoder."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import NOBEL, TINY_WORDS
from hypothesis import given, settings
from hypothesis import strategies as st

from semtoken_rag import analysis as an
from semtoken_rag import encoder as encoder_module
from semtoken_rag import spans as sp
from semtoken_rag.encoder import _BUCKET, Encoder, token_units
from semtoken_rag.text import split_units_many

TEXTS = [" ".join(TINY_WORDS[i % len(TINY_WORDS)] for i in range(n)) + "." for n in (3, 11, 40, 7, 90, 19)]
TEXTS += ["", "   ", "\u200b\ud800 odd é 東京 🚀"]
QUERIES = ["who won", "", "the first prize in 1901 " * 12, "a b c d e f g h i j k l m n o p", "東京?"]


@pytest.fixture(scope="module")
def tiny(tiny_encoder) -> Encoder:
    return Encoder(str(tiny_encoder), device="cpu", max_length=32, window_overlap=8, batch_size=4)


def _same_queries(got, want) -> None:
    assert len(got) == len(want)
    for (p1, t1), (p2, t2) in zip(got, want):
        assert p1.shape == p2.shape and t1.shape == t2.shape
        assert torch.allclose(p1, p2, atol=1e-6) and torch.allclose(t1, t2, atol=1e-6)


def test_encode_gives_the_fingerprints_and_query_vectors_of_the_separate_passes(tiny):
    fps, queries, stats = tiny.encode(TEXTS, QUERIES)
    for a, b in zip(fps, tiny.fingerprint(TEXTS)):
        assert np.array_equal(a.units, b.units) and torch.equal(a.vectors, b.vectors)  # bit for bit
    _same_queries(queries, tiny.embed_queries(QUERIES))
    # the long query (over one 32-token window: truncated) finds no room and takes a batch of its own;
    # the others ride along
    alone = tiny.fingerprint_with_stats(TEXTS)[1].batches
    assert stats.batches == alone + 1


def test_encode_in_groups_equals_one_group(tiny_encoder):
    """Texts encoded in groups of batch_size (CUDA's way: each group's host work overlaps the pass over
    the one before) get the fingerprints of one group, bit for bit, and the queries still ride."""
    one = Encoder(str(tiny_encoder), device="cpu", max_length=32, window_overlap=8, batch_size=4)
    grouped = Encoder(str(tiny_encoder), device="cpu", max_length=32, window_overlap=8, batch_size=4)
    grouped.group_texts = True
    texts = TEXTS * 3  # 27 texts: 7 groups, blank and long texts among them
    want, want_q, _ = one.encode(texts, QUERIES)
    got, got_q, stats = grouped.encode(texts, QUERIES)
    assert len(got) == len(texts) and stats.batches >= 7
    for a, b in zip(got, want):
        assert np.array_equal(a.units, b.units) and torch.equal(a.vectors, b.vectors)
    _same_queries(got_q, want_q)
    assert grouped.encode([], ["who"])[0] == [] and len(grouped.encode([], ["who"])[1]) == 1


def test_encode_queries_only_texts_only_and_blank_texts(tiny):
    fps, queries, stats = tiny.encode([], QUERIES[:2])
    assert fps == [] and stats.batches == 1
    _same_queries(queries, tiny.embed_queries(QUERIES[:2]))
    fps, queries, stats = tiny.encode(["", "  "], ["who"])  # blank texts: no row to ride in
    assert [len(f.units) for f in fps] == [0, 0] and stats.batches == 1
    _same_queries(queries, tiny.embed_queries(["who"]))
    fps, queries, _ = tiny.encode(TEXTS[:2], [])
    assert queries == []
    assert all(torch.equal(a.vectors, b.vectors) for a, b in zip(fps, tiny.fingerprint(TEXTS[:2])))


def test_a_riding_query_does_not_depend_on_its_host(tiny):
    """The same query riding beside different texts, or alone, gets the same vectors."""
    q = ["who won the prize"]
    runs = [tiny.encode([t], q)[1] for t in TEXTS[:5]] + [tiny.embed_queries(q)]
    for other in runs[1:]:
        _same_queries(other, runs[0])


@given(st.lists(st.integers(2, 70), min_size=0, max_size=12), st.lists(st.integers(2, 70), max_size=12),
       st.integers(1, 5))
@settings(max_examples=200, deadline=None)
def test_place_fills_padding_without_overlap(lengths, guests, batch_size):
    enc = Encoder.__new__(Encoder)
    enc.batch_size = batch_size
    enc.bucket = _BUCKET
    batches = enc._batches(lengths) if lengths else []
    placed, alone = Encoder._place(batches, lengths, guests)
    seen = sorted(alone) + sorted(g for riders in placed.values() for _, _, g in riders)
    assert sorted(seen) == list(range(len(guests)))  # each guest once, riding or alone
    for k, riders in placed.items():
        width = -(-max(lengths[i] for i in batches[k]) // _BUCKET) * _BUCKET
        used: dict[int, list[tuple[int, int]]] = {}
        for row, at, g in riders:
            assert at >= lengths[batches[k][row]] and at + guests[g] <= width  # after the host, in the row
            used.setdefault(row, []).append((at, at + guests[g]))
        for parts in used.values():
            parts.sort()
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(parts))  # guests never overlap


@given(st.lists(st.integers(0, 30), min_size=1, max_size=6), st.integers(0, 10_000), st.integers(1, 7))
@settings(max_examples=100, deadline=None)
def test_chunk_stats_many_equals_one_at_a_time(sizes, seed, window):
    rng = np.random.default_rng(seed)
    vectors, bounds, breaks = [], [], []
    for n in sizes:
        vectors.append((rng.standard_normal((n, 8)) * 2).astype(np.float16))
        br = rng.random(n) < 0.3
        if n:
            br[-1] = True
        breaks.append(br)
        cuts = np.flatnonzero(rng.random(n) < 0.4)
        bounds.append(np.unique(np.concatenate([[0, n], cuts])).astype(np.int64))
    many = an.chunk_stats_many(vectors, bounds, breaks, window)
    assert len(many) == len(sizes)
    for got, v, b, br in zip(many, vectors, bounds, breaks):
        one = an.chunk_stats(v, b, br, window)
        for name in ("span_entropy", "seg_entropy", "centroids", "centroid"):
            assert getattr(got, name).tobytes() == getattr(one, name).tobytes(), name  # bit for bit
        assert len(got.seg_entropy) == len(sp.segment_bounds(br)) - 1


@pytest.mark.slow
def test_real_encoder_query_rides_with_chunks_exactly(engine):
    enc = engine.encoder
    questions = ["who got the first nobel prize in physics", "how many times did bardeen win"]
    fps, queries, stats = enc.encode(NOBEL, questions)
    assert stats.batches == enc.fingerprint_with_stats(NOBEL)[1].batches  # no pass of their own
    for a, b in zip(fps, enc.fingerprint(NOBEL)):
        assert torch.equal(a.vectors, b.vectors)
    _same_queries(queries, enc.embed_queries(questions))


def test_chunk_stats_many_a_huge_chunk_among_short_ones(monkeypatch):
    """One long chunk among short and empty ones: each chunk's numbers are still those of the chunk alone,
    and the same when the rows go to float64 a few at a time (a segment's sum runs across blocks)."""
    rng = np.random.default_rng(7)
    sizes = [3, 40, 9000, 0, 25, 12]
    vectors = [rng.standard_normal((n, 8)).astype(np.float16) for n in sizes]
    breaks = [np.arange(n) % 7 == 6 if n else np.zeros(0, bool) for n in sizes]
    for br in breaks:
        if len(br):
            br[-1] = True
    bounds = [np.unique(np.concatenate([[0, n], np.arange(0, n, 3)])).astype(np.int64) for n in sizes]
    many = an.chunk_stats_many(vectors, bounds, breaks, 5)
    monkeypatch.setattr(an, "_ROWS_AT_ONCE", 5)
    blocked = an.chunk_stats_many(vectors, bounds, breaks, 5)
    for got, again, v, b, br in zip(many, blocked, vectors, bounds, breaks):
        one = an.chunk_stats(v, b, br, 5)
        for name in ("span_entropy", "seg_entropy", "centroids", "centroid"):
            assert getattr(got, name).tobytes() == getattr(one, name).tobytes() == getattr(again, name).tobytes(), name


def test_query_ids_are_those_of_the_hugging_face_call(tiny):
    """Queries go to the Rust tokenizer itself: the ids the Hugging Face tokenizer gives with truncation to
    one window (its first tokens), one query or many, odd text and long text included."""
    from semtoken_rag.text import without_surrogates

    queries = QUERIES + [" ", "Röntgen's prize (1901)?", "\ud800 bad \x00\x07 e\u0301 ﬁ", "prize " * 100]
    for q in queries:
        want = tiny.tokenizer([without_surrogates(q)], add_special_tokens=False, truncation=True,
                              max_length=tiny.max_length - 2, verbose=False)["input_ids"][0]
        assert tiny._query_ids([q]) == [list(want)]
    assert tiny._query_ids(queries) == [tiny._query_ids([q])[0] for q in queries]
    assert len(tiny._query_ids(["prize " * 100])[0]) == tiny.max_length - 2


_ODD = "abcé ,.;:-()'\"\u0301\u00a0\u200b\x0b\x1f\t\n\r東京🚀—…$€Σς\ufb01İ0123"


@given(st.lists(st.lists(st.sampled_from([*_ODD, " ", " ", *TINY_WORDS]), max_size=40).map("".join), min_size=1,
                max_size=6),
       st.sampled_from([1 << 16, 3]))
@settings(max_examples=150, deadline=None)
def test_word_by_word_tokenizing_equals_the_whole_texts(tiny, texts, memo_max):
    """Encoder._tokenize (ids from a memo of words where the text allows it, else the whole text's call)
    gives the ids of the tokenizer's call on each whole text and each token's unit by its offsets; with a
    memo small enough to start afresh within a call too."""
    units = split_units_many(texts)
    want = tiny._chunk_tokenizer.encode_batch(texts, add_special_tokens=False)
    old = encoder_module._WORD_MEMO
    try:
        encoder_module._WORD_MEMO = memo_max
        tiny._word_ids.clear()
        for _ in range(2):
            ids, owners = tiny._tokenize(texts, units)
            assert [list(x) for x in ids] == [w.ids for w in want]
            assert [o.tolist() for o in owners] == [token_units(u, w.offsets).tolist() for u, w in zip(units, want)]
            assert len(tiny._word_ids) <= memo_max  # bounded, even when one call brings more new words
    finally:
        encoder_module._WORD_MEMO = old


def test_only_a_bert_tokenizer_goes_word_by_word(tiny):
    """A tokenizer that does not split at whitespace and normalise character by character (a byte-level
    BPE: a word's ids depend on the space before it) always tokenizes whole texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert not encoder_module._splits_at_whitespace(bpe)
    assert encoder_module._splits_at_whitespace(tiny._chunk_tokenizer)
