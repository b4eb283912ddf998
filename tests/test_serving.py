"""Serving many requests: compress_many and micro-batched concurrent calls equal single calls."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import NOBEL

from semtoken_rag import SemToken, SemTokenConfig

pytestmark = pytest.mark.slow  # real engines

QUERIES = ["who got the first nobel prize in physics", "where is the peace prize awarded",
           "what kind of plant is a banana", None, "what does physics study", "Bardeen"]


def requests() -> tuple[list[list[str]], list[str | None]]:
    """Requests with empty and whitespace chunks, a chunk repeated inside a request and chunks shared."""
    lists = [list(NOBEL), [NOBEL[1], "", NOBEL[2]], [NOBEL[2], "   \n", NOBEL[3], NOBEL[2]],
             [NOBEL[0], NOBEL[3]], [NOBEL[3]], [NOBEL[0], NOBEL[1]]]
    return lists, list(QUERIES)


def same(a, b) -> None:
    """Two results agree in everything but timing and cache/encoder counters."""
    assert (a.budget, a.original_tokens, a.compressed_tokens, a.query) == \
        (b.budget, b.original_tokens, b.compressed_tokens, b.query)
    for x, y in zip(a.chunks, b.chunks, strict=True):
        assert (x.index, x.text, x.kept_spans, x.repeat_spans, x.compressed_tokens) == \
            (y.index, y.text, y.kept_spans, y.repeat_spans, y.compressed_tokens)
        assert [(s.start, s.end, s.status) for s in x.spans] == [(s.start, s.end, s.status) for s in y.spans]


@pytest.fixture(scope="module")
def fresh() -> SemToken:
    """An engine of its own with micro-batching on, so that caches start empty (a long window: the wait
    ends as soon as every caller inside the engine has submitted)."""
    eng = SemToken(SemTokenConfig(device="cpu", batch_window_ms=3000))
    yield eng
    eng.close()


@pytest.mark.parametrize("rate", [0.5, 0.2])
def test_compress_many_equals_single_calls(engine, rate):
    lists, queries = requests()
    other = SemToken(SemTokenConfig(device="cpu"))
    many = other.compress_many(lists, queries, rate=rate)
    assert len(many) == len(lists)
    for chunks, query, res in zip(lists, queries, many):
        same(res, engine.compress(chunks, query, rate=rate))
    assert lists == requests()[0]  # the caller's lists are untouched


def test_compress_many_one_encoder_pass_each_chunk_once():
    eng = SemToken(SemTokenConfig(device="cpu"))
    lists, queries = requests()
    distinct = {c for chunks in lists for c in chunks if c.strip()}
    calls = eng.encoder.forward_calls
    out = eng.compress_many(lists, queries, target_tokens=40)
    spent = eng.encoder.forward_calls - calls
    assert eng.cache_stats().entries == len(distinct)
    # one pass over the distinct chunks, the short queries riding in its padding: no batch of their own
    chunk_batches = eng.encoder.fingerprint_with_stats(sorted(distinct))[1].batches
    assert spent == chunk_batches
    assert eng.encoder.encode(sorted(distinct), sorted({q for q in queries if q}))[2].batches == chunk_batches
    assert all(r.cache_hits == 0 and r.encoder_calls == chunk_batches for r in out)
    calls = eng.encoder.forward_calls
    again = eng.compress_many(lists, queries, target_tokens=40)
    assert eng.encoder.forward_calls == calls  # everything cached now
    assert [r.cache_hits for r in again] == [sum(bool(c.strip()) for c in chunks) for chunks in lists]
    for a, b in zip(out, again):
        same(a, b)


def test_compress_many_fits_and_empty_requests(engine):
    out = engine.compress_many([[], ["  "], ["Short text."], NOBEL[:2]], ["q", None, "q", "nobel"], rate=1.0)
    assert [r.texts for r in out] == [[], [""], ["Short text."], NOBEL[:2]]  # (blank chunks give "")
    assert engine.compress_many([], []) == []


def test_compress_many_with_conversations(engine):
    lists = [[NOBEL[0]], [NOBEL[0], NOBEL[2]]]
    engine.memory.forget("conv-many")
    out = engine.compress_many(lists, ["nobel physics", "nobel physics"], rate=0.9,
                               conversation_ids=["conv-many", "conv-many"])
    engine.memory.forget("conv-seq")
    seq = [engine.compress(c, "nobel physics", rate=0.9, conversation_id="conv-seq") for c in lists]
    for a, b in zip(out, seq):
        same(a, b)
    assert out[1].chunks[0].repeat_spans  # the second turn recognised what the first one received


@pytest.mark.parametrize("lists, queries, kwargs, error, match", [
    ([["a b c"], "a b c"], ["q", "q"], {}, TypeError, r"request 1: chunks must be a sequence of str"),
    ([["a b c"], ["x", 3]], ["q", "q"], {}, TypeError, r"request 1: chunks\[1\] must be str"),
    ([["a b c"], ["x"]], ["q", 5], {}, TypeError, r"request 1: query must be str"),
    ([["a b c"]], ["q", "q"], {}, ValueError, "1 chunk lists but 2 queries"),
    ("abc", ["q"], {}, TypeError, "chunk_lists must be a list of lists"),
    ([["a"]], "q", {}, TypeError, "queries must be a list"),
    ([["a b c"]], ["q"], {"rate": 0}, ValueError, "rate must be in"),
    ([["a b c"]], ["q"], {"target_tokens": -3}, ValueError, "target_tokens"),
    ([["a b c"]], ["q"], {"conversation_ids": ["a", "b"]}, ValueError, "conversation_ids"),
    ([["a b c"]], ["q"], {"conversation_ids": [7]}, TypeError, "request 0: conversation id"),
])
def test_compress_many_rejects_bad_requests_before_any_work(engine, lists, queries, kwargs, error, match):
    calls, entries = engine.encoder.forward_calls, engine.cache_stats().entries
    with pytest.raises(error, match=match):
        engine.compress_many(lists, queries, **kwargs)
    assert engine.encoder.forward_calls == calls and engine.cache_stats().entries == entries


def test_acompress_many(engine):
    lists, queries = requests()
    out = asyncio.run(engine.acompress_many(lists[:2], queries[:2], rate=0.4))
    for a, chunks, q in zip(out, lists, queries):
        same(a, engine.compress(chunks, q, rate=0.4))


def test_micro_batching_is_off_by_default_on_cpu(engine):
    assert engine.config.batch_window_ms is None and engine.batcher is None


def variants() -> list[tuple[list[str], str]]:
    """Eight distinct calls: chunk lists never seen by the session engine before this test."""
    out = []
    for i in range(8):
        chunks = [f"Variant {i}. {c}" for c in NOBEL[i % 4:] + NOBEL[:i % 4]]
        out.append((chunks, QUERIES[i % 3]))
    return out


def test_threads_calling_compress_coalesce_and_equal_sequential(engine, fresh):
    calls = variants()
    out: dict[int, object] = {}
    barrier = threading.Barrier(len(calls))
    batches = fresh.batcher.batches

    def work(i):
        chunks, q = calls[i]
        barrier.wait()
        out[i] = fresh.compress(chunks, q, rate=0.3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(out) == len(calls)
    assert fresh.batcher.batches - batches < len(calls)  # encoder work was shared
    for i, (chunks, q) in enumerate(calls):
        same(out[i], engine.compress(chunks, q, rate=0.3))


def test_concurrent_acompress_coalesce_and_equal_sequential(engine, fresh):
    calls = [([f"Async {c}" for c in chunks], q) for chunks, q in variants()]
    batches = fresh.batcher.batches

    async def together():
        return await asyncio.gather(*(fresh.acompress(c, q, rate=0.3) for c, q in calls))

    out = asyncio.run(together())
    assert fresh.batcher.batches - batches < len(calls)
    for res, (chunks, q) in zip(out, calls):
        same(res, engine.compress(chunks, q, rate=0.3))


def test_batched_call_errors_stay_with_their_caller(fresh):
    with pytest.raises(ValueError, match="rate must be in"):
        fresh.compress(["some text here"], "q", rate=2.0)
    res = fresh.compress(NOBEL, "nobel", rate=0.3)  # the engine still serves
    assert res.compressed_tokens <= res.budget


def test_closed_engine_still_compresses():
    eng = SemToken(SemTokenConfig(device="cpu", batch_window_ms=5))
    eng.close()
    res = eng.compress(NOBEL[:2], "nobel prize", rate=0.3)
    assert res.compressed_tokens <= res.budget


def test_close_between_the_check_and_the_session_is_not_an_error():
    """close() landing after compress saw the batcher open, before it joined a session: the call
    encodes on its own, as every call after close() does (was RuntimeError('MicroBatcher is closed'))."""
    eng = SemToken(SemTokenConfig(device="cpu", batch_window_ms=5))
    batcher, session = eng.batcher, eng.batcher.session

    def closed_meanwhile():
        batcher.close()
        return session()

    batcher.session = closed_meanwhile
    res = eng.compress(NOBEL[:2], "nobel prize", rate=0.3)
    assert batcher.closed and res.compressed_tokens <= res.budget
    assert res.texts == SemToken(SemTokenConfig(device="cpu")).compress(NOBEL[:2], "nobel prize", rate=0.3).texts


def test_a_call_served_from_the_cache_does_not_hold_up_other_callers(fresh, monkeypatch):
    """A call whose chunks and query are all cached submits nothing: it leaves its session before its own
    pipeline runs, so a concurrent cold call's batch does not wait out the window for it (it did: 0.66 s
    against 0.16 s with a 500 ms window and three cached callers)."""
    chunks = [f"Cached {c}" for c in NOBEL]
    fresh.compress(chunks, QUERIES[0], rate=0.3)  # now cached
    seen = []
    real = fresh._compress

    def pipeline(*args, **kwargs):
        seen.append(fresh.batcher.announced)  # open sessions that have not submitted, while it runs
        return real(*args, **kwargs)

    monkeypatch.setattr(fresh, "_compress", pipeline)
    cached = fresh.compress(chunks, QUERIES[0], rate=0.3)
    cold = fresh.compress([f"Cold {c}" for c in NOBEL], QUERIES[1], rate=0.3)
    assert seen == [0, 0] and cached.encoder_calls == 0 and cold.encoder_calls > 0


def test_an_engine_nobody_holds_is_collected_and_its_worker_stops():
    """The micro-batcher's worker thread holds its engine weakly (a dropped engine kept its model, caches
    and thread alive for good)."""
    import gc
    import weakref

    eng = SemToken(SemTokenConfig(device="cpu", batch_window_ms=5))
    assert eng.compress(NOBEL[:2], "nobel prize", rate=0.3).encoder_calls > 0  # the worker served it
    worker, ref = eng.batcher._worker, weakref.ref(eng)
    del eng
    gc.collect()
    assert ref() is None
    worker.join(timeout=60)
    assert not worker.is_alive()


def test_with_block_closes_the_engine_and_the_registry_closes_what_it_forgets():
    from semtoken_rag.registry import clear_registry, shared_engine

    with SemToken(SemTokenConfig(device="cpu", batch_window_ms=5)) as eng:
        first = eng.compress(NOBEL[:2], "nobel prize", rate=0.3)
        assert not eng.batcher.closed
    assert eng.batcher.closed
    assert eng.compress(NOBEL[:2], "nobel prize", rate=0.3).texts == first.texts  # still serves, on its own
    clear_registry()
    shared = shared_engine(SemTokenConfig(device="cpu", batch_window_ms=5))
    clear_registry()
    assert shared.batcher.closed and shared_engine(SemTokenConfig(device="cpu", batch_window_ms=5)) is not shared
    clear_registry()


def _forked_child(engine, chunks, out):  # (module level: the fork context runs it in the child)
    import torch

    torch.set_num_threads(1)  # (torch's own thread pool does not survive a fork: the usual first step)
    out.put(engine.compress(chunks, "nobel prize", rate=0.3).texts)


def test_a_forked_child_compresses_on_its_own():
    """gunicorn --preload / multiprocessing with fork: the child has no batcher worker thread, so its
    batcher is closed there and its calls encode on their own (they waited forever)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    eng = SemToken(SemTokenConfig(device="cpu", batch_window_ms=5))
    eng.compress(NOBEL[:1], "nobel prize", rate=0.3)
    chunks = [f"Forked {c}" for c in NOBEL[1:3]]
    out = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(eng, chunks, out))
    child.start()
    child.join(timeout=240)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert out.get(timeout=10) == SemToken(SemTokenConfig(device="cpu")).compress(chunks, "nobel prize", rate=0.3).texts
    assert not eng.batcher.closed  # (the parent's batcher is untouched)
    eng.close()
