"""Pre-warming keeps each chunk's analysis (its query-independent arrays and vector statistics) in its
fingerprint entry; a later engine's calls on those chunks take it from there instead of working it out
again, and give exactly what a fresh engine gives. Unit tier: the tiny random-weight BERT and the bundled
sample's passages; one slow test on the real encoder."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

import semtoken_rag
from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag import analysis as an
from semtoken_rag.diskstore import DirectoryStore
from semtoken_rag.fileformat import CacheEntry
from semtoken_rag.keys import cache_key

SAMPLE = Path(semtoken_rag.__file__).parent / "data" / "sample_nq.jsonl"


def sample(n: int = 2) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:n]]
    return [(r["question"], [p["text"] if isinstance(p, dict) else p for p in r["passages"]]) for r in rows]


def tiny_config(tiny_encoder, **kw) -> SemTokenConfig:
    return SemTokenConfig(encoder=str(tiny_encoder), device="cpu", dtype="float32", max_length=32,
                          window_overlap=8, **kw)


def described(result) -> list:
    return [(c.text, c.kept_spans, c.original_tokens, c.compressed_tokens, c.relevance,
             [(s.start, s.end, s.status, s.entropy, s.relevance, s.score) for s in c.spans]) for c in result.chunks]


def entries(root: Path, engine: SemToken, texts: list[str]) -> list[CacheEntry | None]:
    return DirectoryStore(root).get_many([cache_key(t, engine.encoder.identity) for t in texts])


def test_calls_on_prewarmed_chunks_take_their_analysis_from_the_store_and_equal_fresh_calls(tiny_encoder, tmp_path):
    requests = sample(3)
    warmer = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    assert warmer.prewarm([p for _, ps in requests for p in ps]) > 0
    stored = entries(tmp_path, warmer, requests[0][1])
    prefix = warmer._stored_prefix
    assert prefix and all(e is not None and prefix + "costs" in e.arrays for e in stored)
    fresh = SemToken(tiny_config(tiny_encoder))  # no store: works everything out
    replica = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))  # a new process on the same store
    stats_made = []
    real = an.chunk_stats_many
    for question, passages in requests:
        for rate in (0.5, 0.2):
            want = fresh.compress(passages, question, rate=rate)
            an.chunk_stats_many = lambda *a, **k: stats_made.append(1) or real(*a, **k)
            try:
                got = replica.compress(passages, question, rate=rate)
            finally:
                an.chunk_stats_many = real
            assert described(got) == described(want)
            assert got.compressed_tokens == want.compressed_tokens <= got.budget
    n = len({p for _, ps in requests for p in ps if p.strip()})
    assert replica.analyses.misses == 0 and len(replica.analyses) == n  # every chunk's analysis adopted
    assert not stats_made  # (and its vector statistics: none worked out)
    assert fresh.analyses.misses == n
    texts = [p for _, ps in requests for p in ps]  # (the whole texts' counts: this process's tokenizer's)
    assert replica.analyses.counts(replica._spec, texts).tolist() == replica.tokenizer.count_many(texts).tolist()


def test_a_stored_analysis_that_does_not_fit_its_chunk_is_worked_out_again(tiny_encoder, tmp_path, caplog):
    question, passages = sample(1)[0]
    warmer = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    warmer.prewarm(passages)
    prefix = warmer._stored_prefix
    store = DirectoryStore(tmp_path)
    key = cache_key(passages[0], warmer.encoder.identity)
    entry = store.get(key)
    broken = dict(entry.arrays)
    broken[prefix + "bounds"] = np.array([0, 1], dtype=np.int64)  # does not end at the chunk's last unit
    store.put(key, CacheEntry(broken, entry.encode_seconds))
    key2 = cache_key(passages[1], warmer.encoder.identity)
    entry2 = store.get(key2)
    short = {k: v for k, v in entry2.arrays.items() if k != prefix + "centroids"}  # an array missing
    store.put(key2, CacheEntry(short, entry2.encode_seconds))
    replica = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="semtoken_rag"):
        got = replica.compress(passages, question, rate=0.33)
    assert described(got) == described(SemToken(tiny_config(tiny_encoder)).compress(passages, question, rate=0.33))
    assert replica.analyses.misses == 2  # those two, analysed afresh; the others adopted
    assert "does not fit" in caplog.text


def test_settings_name_the_stored_analysis(tiny_encoder, tmp_path):
    """An engine whose analysis settings differ finds no analysis of its own in entries pre-warmed by another
    (it works its own out, and gives what a fresh engine with its settings gives); a callable budget tokenizer
    keeps none (no other engine could tell it counts alike)."""
    question, passages = sample(1)[0]
    SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path)).prewarm(passages)
    other = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path, max_segment_units=7))
    got = other.compress(passages, question, rate=0.33)
    assert other.analyses.misses == len(passages)
    want = SemToken(tiny_config(tiny_encoder, max_segment_units=7)).compress(passages, question, rate=0.33)
    assert described(got) == described(want)
    assert len({SemToken(tiny_config(tiny_encoder, **kw))._stored_prefix for kw in (
        {}, {"max_segment_units": 7}, {"tokenizer": "cl100k_base"}, {"tau": 0.5}, {"window_units": 9},
        {"use_clustering": False}, {"protect": [r"\d+"]})}) == 7
    words = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path / "w", tokenizer=lambda t: len(t.split())))
    assert words._stored_prefix is None
    words.prewarm(passages)
    assert all(not any(k.startswith("analysis.") for k in e.arrays) for e in entries(tmp_path / "w", words, passages))


def test_prewarm_analyses_false_keeps_fingerprints_alone(tiny_encoder, tmp_path):
    question, passages = sample(1)[0]
    engine = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path, prewarm_analyses=False))
    engine.prewarm(passages)
    stored = entries(tmp_path, engine, passages)
    assert all(e is not None and set(e.arrays) == {"fingerprints", "units"} for e in stored)
    replica = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    replica.compress(passages, question, rate=0.33)
    assert replica.analyses.misses == len(passages)


def test_prewarm_without_a_store_keeps_the_analysis_in_memory_entries(tiny_encoder):
    question, passages = sample(1)[0]
    engine = SemToken(tiny_config(tiny_encoder))
    engine.prewarm(passages)
    engine.analyses.clear()
    engine.compress(passages, question, rate=0.33)
    assert engine.analyses.misses == 0


def test_stored_version_guard():
    """Every stored array (unit costs, segment breaks, protected groups, fenced blocks, blind units, span
    bounds, entropies, centroids) of the bundled sample's passages, with fixed pseudo-random fingerprints
    whose neighbours are alike (spans form) at the default settings, as a digest (floats rounded): when it
    changes, entries pre-warmed by an older version hold other arrays under the same names. Bump
    analysis.STORED_VERSION, then update the digest here."""
    from semtoken_rag.text import split_units

    cfg = SemTokenConfig()
    spec = an.AnalysisSpec(semtoken_rag.budget.BudgetTokenizer("llama3"), (), cfg.max_segment_units, 96, cfg.tau,
                           cfg.max_span_units, "guard")
    texts = [p for _, ps in sample(6) for p in ps if p.strip()][:40]
    units = [split_units(t) for t in texts]
    rng = np.random.default_rng(0)
    vectors = [(np.cumsum(rng.standard_normal((len(u), 8)), axis=0) + 8).astype(np.float16) for u in units]
    arrays = an.analyse_for_store(spec, texts, units, vectors, cfg.window_units, True, "p.")
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        for name in sorted(a):
            x = a[name]
            h.update(name.encode() + np.ascontiguousarray(np.round(x, 3) if x.dtype.kind == "f" else x).tobytes())
    assert sum(len(a["p.bounds"]) - 1 for a in arrays) < sum(len(u) for u in units)  # (some spans of several units)
    assert (an.STORED_VERSION, h.hexdigest()) == (1, "4a9c24ba296df0a9")


def test_a_stored_analysis_of_other_integer_types_or_values_out_of_range_is_ignored(tiny_encoder, tmp_path):
    """int8 bounds (the right values), a protected group id past the chunk's units, NaN centroids or a
    negative entropy do not fit: the call works the analysis out (no exception where offsets are added to
    them) and equals a fresh engine's."""
    question, passages = sample(1)[0]
    warmer = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    warmer.prewarm(passages)
    prefix, store = warmer._stored_prefix, DirectoryStore(tmp_path)
    changes = [("bounds", lambda a: a.astype(np.int8)), ("group", lambda a: np.full_like(a, 10 ** 6)),
               ("centroids", lambda a: np.full_like(a, np.nan)), ("seg_entropy", lambda a: np.full_like(a, -1.0))]
    for text, (name, change) in zip(passages[1:5], changes):
        key = cache_key(text, warmer.encoder.identity)
        entry = store.get(key)
        arrays = dict(entry.arrays)
        arrays[prefix + name] = change(np.array(arrays[prefix + name]))
        store.put(key, CacheEntry(arrays, entry.encode_seconds))
    replica = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    got = replica.compress(passages, question, rate=0.33)
    assert replica.analyses.misses == 4
    assert described(got) == described(SemToken(tiny_config(tiny_encoder)).compress(passages, question, rate=0.33))


def _analysis_arrays(entry: CacheEntry) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in entry.arrays.items() if k.startswith(an.STORED_NAMESPACE)}


def test_prewarm_gives_stored_entries_that_lack_it_their_analysis_without_encoding(tiny_encoder, tmp_path):
    """A store pre-warmed before analyses were kept (or under another version or settings) gets them on the
    next pre-warm, from its stored fingerprints: nothing encoded, the same arrays as a pre-warm that kept them
    from the start, and a third pre-warm finds nothing left to do."""
    requests = sample(3)
    texts = [p for _, ps in requests for p in ps]
    SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path / "s", prewarm_analyses=False)).prewarm(texts)
    SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path / "ref")).prewarm(texts)
    warmer = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path / "s"))
    before = entries(tmp_path / "s", warmer, texts)
    assert all(set(e.arrays) == {"fingerprints", "units"} for e in before if e is not None)
    n = len({t for t in texts if t.strip()})
    assert warmer._prewarm(texts, 4) == (0, n)
    assert warmer.encoder.forward_calls == 0
    stats = warmer.cache_stats()  # (reading entries to give them their analysis is no cache hit)
    assert (stats.hits, stats.disk_hits, stats.encoder_seconds_saved) == (0, 0, 0.0)
    after, ref = entries(tmp_path / "s", warmer, texts), entries(tmp_path / "ref", warmer, texts)
    for b, a, r in zip(before, after, ref):
        if b is None:
            assert a is None and r is None
            continue
        assert _analysis_arrays(a) == _analysis_arrays(r) and _analysis_arrays(a)
        assert all(a[k].tobytes() == b[k].tobytes() for k in ("fingerprints", "units"))
        assert a.encode_seconds == b.encode_seconds
    assert SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path / "s"))._prewarm(texts, 4) == (0, 0)
    replica = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path / "s"))
    fresh = SemToken(tiny_config(tiny_encoder))
    for question, passages in requests:
        assert described(replica.compress(passages, question, rate=0.33)) == described(
            fresh.compress(passages, question, rate=0.33))
    assert replica.analyses.misses == 0 and replica.encoder.forward_calls == len(requests)  # (the queries)


def test_prewarm_with_other_settings_replaces_the_stored_analysis(tiny_encoder, tmp_path):
    question, passages = sample(1)[0]
    first = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    first.prewarm(passages)
    other = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path, max_segment_units=7))
    assert other._prewarm(passages, 256) == (0, len(passages))
    for e in entries(tmp_path, other, passages):  # one analysis an entry: the latest pre-warm's
        assert {k.rsplit(".", 1)[0] + "." for k in e.arrays if k.startswith(an.STORED_NAMESPACE)} == {
            other._stored_prefix}
    replica = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path, max_segment_units=7))
    want = SemToken(tiny_config(tiny_encoder, max_segment_units=7)).compress(passages, question, rate=0.33)
    assert described(replica.compress(passages, question, rate=0.33)) == described(want)
    assert replica.analyses.misses == 0
    # the first engine's memory still holds its own analysis; the store's entries are what count
    assert first._prewarm(passages, 256) == (0, len(passages))
    assert all(first._stored_prefix + "costs" in e.arrays for e in entries(tmp_path, first, passages))


def test_prewarm_encodes_a_stored_entry_whose_fingerprints_do_not_fit_again(tiny_encoder, tmp_path):
    """An entry whose header is fine but whose fingerprints do not fit its chunk (found when its analysis
    is added) is encoded afresh, with its analysis."""
    passages = sample(1)[0][1]
    SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path, prewarm_analyses=False)).prewarm(passages)
    store = DirectoryStore(tmp_path)
    warmer = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    key = cache_key(passages[0], warmer.encoder.identity)
    bad = dict(store.get(key).arrays)
    bad["units"] = bad["units"] + len(passages[0])  # past the chunk's end
    store.put(key, CacheEntry(bad))
    assert warmer._prewarm(passages, 256) == (1, len(passages) - 1)
    fixed = store.get(key)
    assert fixed["units"][-1, 1] <= len(passages[0]) and warmer._stored_prefix + "costs" in fixed.arrays


def test_the_first_bytes_of_an_nq_entry_name_its_stored_analysis(tiny_encoder, tmp_path):
    """Stores tell which entries lack the analysis from their first NAMES_PEEK bytes past the key: those
    bytes must reach the analysis's first array (after the fingerprints and units)."""
    from semtoken_rag.fileformat import NAMES_PEEK, array_names, encode_entry, header_size

    passages = sample(1)[0][1]
    engine = SemToken(tiny_config(tiny_encoder, cache_dir=tmp_path))
    engine.prewarm(passages)
    key = cache_key(passages[0], engine.encoder.identity)
    data = encode_entry(key, DirectoryStore(tmp_path).get(key))
    names = array_names(data[:header_size(key) + NAMES_PEEK], key)
    assert names[:3] == ["fingerprints", "units", engine._stored_prefix + "costs"]
    assert DirectoryStore(tmp_path).has_arrays([key, "0" * 32], engine._stored_prefix) == [True, False]


@pytest.mark.slow
def test_real_encoder_prewarmed_replica_equals_fresh(tmp_path, engine):
    requests = sample(6)
    cfg = engine.config.model_copy(update={"cache_dir": str(tmp_path)})
    SemToken(cfg).prewarm([p for _, ps in requests for p in ps])
    replica = SemToken(cfg)
    for question, passages in requests:
        assert described(replica.compress(passages, question, rate=0.33)) == described(
            engine.compress(passages, question, rate=0.33))
    assert replica.analyses.misses == 0


@pytest.mark.slow
def test_cli_prewarm_keeps_the_analysis_for_the_replicas_tokenizer_or_none(tmp_path):
    from semtoken_rag.cli import main

    passages = sample(1)[0][1][:4]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    common = ["--device", "cpu", "--dtype", "float32", "--quiet"]
    assert main(["prewarm", str(corpus), "--store", str(tmp_path / "a"), "--tokenizer", "cl100k_base", *common]) == 0
    assert main(["prewarm", str(corpus), "--store", str(tmp_path / "b"), "--no-analyses", *common]) == 0
    replica = SemToken(SemTokenConfig(device="cpu", dtype="float32", tokenizer="cl100k_base", cache_dir=tmp_path / "a"))
    default = SemToken(SemTokenConfig(device="cpu", dtype="float32"))
    assert replica._stored_prefix != default._stored_prefix
    assert all(replica._stored_prefix + "costs" in e.arrays for e in entries(tmp_path / "a", replica, passages))
    assert all(set(e.arrays) == {"fingerprints", "units"} for e in entries(tmp_path / "b", replica, passages))
    replica.compress(passages, "who got the first nobel prize in physics", rate=0.33)
    assert replica.analyses.misses == 0
