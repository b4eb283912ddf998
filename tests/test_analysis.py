"""The per-chunk analysis memo (analysis.py): what it returns equals the per-call computation, it is hit on
later calls, bounded in bytes and reported, and keyed by everything the analysis depends on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag import analysis as an
from semtoken_rag import evidence as ev
from semtoken_rag import spans as sp
from semtoken_rag import structure as st
from semtoken_rag.budget import BudgetTokenizer

CHUNKS = [
    "The first prize was awarded in 1901. Mail prize@nobel.org for the list of awards.",
    "Intro to the war.\n```sh\nls -l the river\n```\n| 1. city | 2. year |\n- a list item. Still it.",
    "   ",
    "Bananas are a fruit. Who awarded the banana prize? The city of Paris, in 1999, to Ann Lee.",
    "the the the the the the the the the the the the the the the the the the the the",
]
LEVERS = {"lexical_weight": 0.3, "neighbour_weight": 0.1, "answer_type_weight": 0.05, "repeat_guard": True,
          "partial_fit": True}


def _engine(tiny_encoder, **kw) -> SemToken:
    return SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8,
                                   **kw))


def _call(engine: SemToken, chunks: list[str]):
    fps = engine.encoder.fingerprint(chunks)
    units = [fp.units for fp in fps]
    sizes = [len(u) for u in units]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    vectors = torch.cat([fp.vectors for fp in fps]).float()
    return units, vectors, offsets


def _spans(res) -> list:
    return [c.kept_spans for c in res.chunks]


def test_call_analysis_equals_the_per_call_computation(tiny_encoder):
    engine = _engine(tiny_encoder, protect=[r"\S+@\S+", r"Ann Lee"], max_segment_units=6)
    units, vectors, offsets = _call(engine, CHUNKS)
    memo = an.AnalysisMemo(1 << 20)
    # a first call analyses some of the chunks, the second mixes memo hits and fresh chunks
    sub = [0, 3]
    memo.analyse(engine._spec, [CHUNKS[i] for i in sub], [units[i] for i in sub],
                 torch.cat([vectors[offsets[i]:offsets[i + 1]] for i in sub]),
                 np.array([0, len(units[0]), len(units[0]) + len(units[3])]))
    got = memo.analyse(engine._spec, CHUNKS, units, vectors, offsets)
    assert (memo.hits, memo.misses) == (2, 5)
    struct = st.call_structure(CHUNKS, units, engine._protect, None)
    pieces = [t[a:e] for t, u in zip(CHUNKS, units) if len(u)
              for a, e in zip(np.concatenate([[u[0, 0]], u[:-1, 1]]).tolist(), u[:, 1].tolist())]
    costs = engine.tokenizer.count_many(pieces)
    clauses = np.concatenate([sp.clause_ends(t, u) for t, u in zip(CHUNKS, units)])
    breaks = st.join_groups(sp.cap_segment_costs(sp.cap_segments(struct.breaks, 6, clauses), costs, 96), struct.group)
    assert got.costs.tolist() == costs.tolist()
    assert got.breaks.tolist() == breaks.tolist()
    assert got.group.tolist() == struct.group.tolist() and (got.group >= 0).sum() >= 3
    assert got.block.tolist() == struct.block.tolist() and (got.block >= 0).any()
    assert got.fence.tolist() == struct.fence.tolist()
    assert got.bounds.tolist() == sp.local_clusters(vectors, breaks, engine.config.tau,
                                                    engine.config.max_span_units).tolist()
    # the call's rows normalised once by the caller (as the engine does for maxsim): the same analysis
    again = an.AnalysisMemo(1 << 20).analyse(engine._spec, CHUNKS, units, vectors, offsets,
                                             normed=torch.nn.functional.normalize(vectors.float(), dim=-1))
    assert again.bounds.tolist() == got.bounds.tolist() and again.breaks.tolist() == got.breaks.tolist()
    chunk_of = np.repeat(np.arange(len(CHUNKS)), np.diff(offsets))
    blind = np.zeros(len(chunk_of), dtype=bool)
    blind[1:] = (vectors[1:] == vectors[:-1]).all(dim=-1).numpy() & (chunk_of[1:] == chunk_of[:-1])
    assert got.blind.tolist() == blind.tolist()
    # evidence, memoised per chunk, equals evidence.py's per call
    terms = [t for c, u in zip(CHUNKS, units) for t in ev.unit_terms(c, u)]
    codes = an.unit_term_codes(memo, engine._spec, CHUNKS, units, got)
    assert codes.tolist() == ev.term_codes(terms).tolist()
    assert codes.tolist() == an.unit_term_codes(memo, engine._spec, CHUNKS, units, got).tolist()  # from the memo
    words = [w for c, u in zip(CHUNKS, units) for w in ev.unit_words(c, u)]
    segs = sp.segment_bounds(got.breaks).tolist()
    assert an.segment_keys(memo, engine._spec, CHUNKS, units, got).tolist() == [
        hash(" ".join(words[a:b])) for a, b in itertools.pairwise(segs)]
    for kind in ev.ANSWER_TYPES:
        for exclude in (frozenset(), frozenset({"paris", "1999", "ann"})):
            hits = an.type_hits(memo, engine._spec, CHUNKS, units, got, kind, exclude)
            assert hits.tolist() == np.concatenate([ev.type_hits(c, u, kind, exclude)
                                                    for c, u in zip(CHUNKS, units)]).tolist()


def test_memo_hit_on_a_second_call_and_same_results(tiny_encoder):
    engine = _engine(tiny_encoder, **LEVERS)
    fresh = _engine(tiny_encoder, analysis_memo_max_bytes=0, **LEVERS)  # analyses every call afresh
    query = "who awarded the first prize in 1901"
    first = engine.compress(CHUNKS, query, rate=0.5)
    assert (engine.analyses.hits, engine.analyses.misses) == (0, len(CHUNKS))
    stats = engine.cache_stats()
    assert stats.analyses == len(CHUNKS) and stats.analysis_bytes == engine.analyses.nbytes > 0
    second = engine.compress(CHUNKS, query, rate=0.3)
    assert (engine.analyses.hits, engine.analyses.misses) == (len(CHUNKS), len(CHUNKS))
    assert _spans(first) == _spans(fresh.compress(CHUNKS, query, rate=0.5))
    assert _spans(second) == _spans(fresh.compress(CHUNKS, query, rate=0.3))
    assert fresh.cache_stats().analyses == 0 and fresh.cache_stats().analysis_bytes == 0
    # the whole chunks' token counts come from the memo too, and equal a fresh count
    assert engine.analyses.counts(engine._spec, CHUNKS).tolist() == engine.tokenizer.count_many(CHUNKS).tolist()
    engine.clear_caches()
    assert engine.cache_stats().analyses == 0 and engine.cache_stats().analysis_bytes == 0


def test_chunk_stats_depend_on_the_chunk_alone(tiny_encoder):
    """A chunk's memoised vector statistics are the same whatever call first brought it, so a warm call
    gives what a cold one would, and compress_many what single calls would."""
    together, alone = _engine(tiny_encoder, **LEVERS), _engine(tiny_encoder, **LEVERS)
    query = "who awarded the first prize in 1901"
    together.compress(CHUNKS, query, rate=0.5)
    alone.compress([CHUNKS[3]], query, rate=0.5)

    def stats(engine: SemToken, text: str) -> an.ChunkStats:
        entry = engine.analyses._lru.get((engine._spec.key, text))
        found = [v for k, v in entry.extras.items() if isinstance(k, tuple) and k[0] == "stats"]
        assert len(found) == 1
        return found[0]

    a, b = stats(together, CHUNKS[3]), stats(alone, CHUNKS[3])
    for name in ("span_entropy", "seg_entropy", "centroids", "centroid"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name  # (bit for bit, nan too)
    # and a warm call on the chunks equals a fresh engine's cold one
    warm = together.compress(CHUNKS, "where was the banana prize awarded", rate=0.3)
    cold = _engine(tiny_encoder, **LEVERS).compress(CHUNKS, "where was the banana prize awarded", rate=0.3)
    assert _spans(warm) == _spans(cold)


def test_extras_are_charged_to_the_entry(tiny_encoder):
    engine = _engine(tiny_encoder)
    units, vectors, offsets = _call(engine, CHUNKS)
    memo = an.AnalysisMemo(1 << 20)
    call = memo.analyse(engine._spec, CHUNKS, units, vectors, offsets)
    before = memo.nbytes
    assert before == sum(e.nbytes for e in call.chunks)
    an.unit_term_codes(memo, engine._spec, CHUNKS, units, call)
    assert memo.nbytes > before and memo.nbytes == sum(e.nbytes for e in call.chunks)


def test_memo_bytes_are_bounded(tiny_encoder):
    one = _engine(tiny_encoder)
    one.compress(CHUNKS[:1], "prize", rate=0.5)
    entry_bytes = one.cache_stats().analysis_bytes
    bound = int(2.5 * entry_bytes)
    engine = _engine(tiny_encoder, analysis_memo_max_bytes=bound)
    texts = [f"{CHUNKS[0]} Number {i} of the list." for i in range(8)]
    for t in texts:
        engine.compress([t], "prize", rate=0.5)
        assert engine.cache_stats().analysis_bytes <= bound
    assert 1 <= engine.cache_stats().analyses < len(texts)
    assert engine.analyses._lru.evictions > 0


def test_memo_keyed_by_tokenizer_protect_and_settings(tiny_encoder):
    engine = _engine(tiny_encoder)
    units, vectors, offsets = _call(engine, CHUNKS)
    memo = an.AnalysisMemo(1 << 20)  # one memo shared by several settings
    chars = BudgetTokenizer(lambda t: len(t))
    specs = {
        "llama3": engine._spec,
        "chars": an.AnalysisSpec(chars, engine._protect, 48, 96, 0.9, 16, engine._namespace),
        "protect": an.AnalysisSpec(engine.tokenizer, st.compile_patterns([r"\S+@\S+"]), 48, 96, 0.9, 16,
                                   engine._namespace),
        "caps": an.AnalysisSpec(engine.tokenizer, engine._protect, 3, 96, 0.9, 16, engine._namespace),
        "tau": an.AnalysisSpec(engine.tokenizer, engine._protect, 48, 96, -1.0, 16, engine._namespace),
        "encoder": an.AnalysisSpec(engine.tokenizer, engine._protect, 48, 96, 0.9, 16, "other-encoder"),
    }
    assert len({s.key for s in specs.values()}) == len(specs)
    got = {}
    for name, spec in specs.items():
        misses = memo.misses
        got[name] = memo.analyse(spec, CHUNKS, units, vectors, offsets)
        assert memo.misses == misses + len(CHUNKS), name  # never served another setting's entries
    assert len(memo) == len(specs) * len(CHUNKS)
    # the same tokenizer by name is the same key; a callable is only ever itself
    same = an.AnalysisSpec(BudgetTokenizer("llama3"), engine._protect, 48, 96, 0.9, 16, engine._namespace)
    assert same.key == engine._spec.key
    other_chars = an.AnalysisSpec(BudgetTokenizer(lambda t: len(t)), engine._protect, 48, 96, 0.9, 16,
                                  engine._namespace)
    assert other_chars.key != specs["chars"].key
    assert got["chars"].costs.tolist() != got["llama3"].costs.tolist()
    assert got["chars"].costs.sum() == sum(len(t[u[0, 0]:u[-1, 1]]) for t, u in zip(CHUNKS, units) if len(u))
    assert (got["protect"].group >= 0).any() and not (got["llama3"].group >= 0).any()
    assert got["caps"].breaks.sum() > got["llama3"].breaks.sum()
    assert len(got["tau"].bounds) < len(got["llama3"].bounds)


@pytest.mark.parametrize("tokenizer", [lambda t: len(t.split()), "cl100k_base"])
def test_engines_with_other_tokenizers_count_their_own(tiny_encoder, tokenizer):
    base = _engine(tiny_encoder)
    other = _engine(tiny_encoder, tokenizer=tokenizer)
    for e in (base, other):
        e.compress(CHUNKS, "prize", rate=0.5)
        e.compress(CHUNKS, "prize", rate=0.4)
    units, vectors, offsets = _call(base, CHUNKS)
    for e in (base, other):
        call = e.analyses.analyse(e._spec, CHUNKS, units, vectors, offsets)
        pieces = [t[a:b] for t, u in zip(CHUNKS, units) if len(u)
                  for a, b in zip(np.concatenate([[u[0, 0]], u[:-1, 1]]).tolist(), u[:, 1].tolist())]
        assert call.costs.tolist() == e.tokenizer.count_many(pieces).tolist()


def _full_band_clusters(vectors: torch.Tensor, break_after: np.ndarray, tau: float, max_units: int) -> list[int]:
    """local_clusters as it was: the whole band computed, then the scan (the reference)."""
    n = int(vectors.shape[0])
    k = max(1, min(max_units, n))
    normed = torch.nn.functional.normalize(vectors.float(), dim=-1)
    padded = torch.cat([normed, torch.zeros((k, normed.shape[1]))])
    band = torch.stack([(normed * padded[j + 1:j + 1 + n]).sum(-1) for j in range(k - 1)], dim=1).numpy() \
        if k > 1 else np.zeros((n, 0))
    bounds, t = [0], 0
    while t < n:
        j = t + 1
        while j < n and j - t < k and not break_after[j - 1] and band[t, j - t - 1] > tau:
            j += 1
        bounds.append(j)
        t = j
    return bounds


def test_local_clusters_reads_the_band_it_needs_only():
    rng = np.random.default_rng(7)
    for _ in range(150):
        n, d = int(rng.integers(1, 200)), int(rng.choice([4, 32]))
        v = torch.randn(n, d)
        for i in range(1, n):  # runs of near-copies, so that long spans form
            if rng.random() < 0.5:
                v[i] = v[i - 1] + 0.1 * torch.randn(d)
        v = v.half().float()
        brk = rng.random(n) < 0.1
        brk[-1] = True
        tau, mu = float(rng.choice([0.9, 0.5, -1.0])), int(rng.choice([1, 2, 5, 16]))
        assert sp.local_clusters(v, brk, tau, mu).tolist() == _full_band_clusters(v, brk, tau, mu)


def test_result_spans_report_every_window_entropy(tiny_encoder):
    """Selection reads the window entropy of spans of several units only; a result's spans still report
    every span's, worked out when read, equal to the statistics selection used."""
    engine = _engine(tiny_encoder, tau=0.0)  # (spans of several units and single ones)
    res = engine.compress(CHUNKS, "who awarded the first prize in 1901", rate=0.5)
    fps = engine.encoder.fingerprint(CHUNKS)
    for text, chunk, fp in zip(CHUNKS, res.chunks, fps):
        entry = engine.analyses._lru.get((engine._spec.key, text))
        every = an.window_entropy(fp.vectors.numpy(), entry.bounds, engine.config.window_units)
        assert len(chunk.spans) == len(every)
        assert [s.entropy for s in chunk.spans] == [float(h) for h in every]
        assert all(np.isfinite(s.entropy) for s in chunk.spans)
        assert not any(callable(c) for c in chunk.spans._cols)  # read once: the fingerprints are let go
        stats = next(v for k, v in entry.extras.items() if isinstance(k, tuple) and k[0] == "stats")
        wide = np.diff(entry.bounds) > 1
        assert np.array_equal(stats.span_entropy[wide], every[wide])
        assert np.isnan(stats.span_entropy[~wide]).all()
    widths = np.concatenate([np.diff(engine.analyses._lru.get((engine._spec.key, t)).bounds) for t in CHUNKS])
    assert (widths > 1).any() and (widths == 1).any()
