"""Unit tier: one engine shared by threads and tasks, as a web server shares it (on the tiny random-weight BERT).

Races are forced, not waited for: a call is paused inside a step (through the conversation memory's own
``query``, observed, not changed) while another thread does what a server may do at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
from conftest import TINY_WORDS

from semtoken_rag import SemToken, SemTokenConfig

CHUNKS = [" ".join(TINY_WORDS[(i * 7 + k) % len(TINY_WORDS)] for k in range(40)) + "." for i in range(6)]
QUERY = " ".join(TINY_WORDS[:3])


@pytest.fixture()
def shared(tiny_encoder):
    eng = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    eng.compress(CHUNKS, QUERY, rate=0.4)  # fingerprints cached: calls below are host work only
    yield eng
    eng.close()


def texts(res):
    return [c.text for c in res.chunks]


class PauseAfterQuery:
    """Wraps ``engine.memory.query``: the first call that queries ``conversation`` stops after its query until
    ``go`` is set; ``queried`` says it got there, ``calls`` counts every query of it, ``done`` is set when a
    request's selection (``engine._compress``) has returned."""

    def __init__(self, engine: SemToken, conversation: str) -> None:
        self.engine, self.conversation, self.original = engine, conversation, engine.memory.query
        self.queried, self.go, self.done, self.calls = threading.Event(), threading.Event(), threading.Event(), 0
        engine.memory.query = self
        selection = engine._compress

        def observed(*args, **kwargs):
            try:
                return selection(*args, **kwargs)
            finally:
                self.done.set()

        engine._compress = observed

    def __call__(self, conversation_id, *args, **kwargs):
        out = self.original(conversation_id, *args, **kwargs)
        if conversation_id == self.conversation:
            self.calls += 1
            if self.calls == 1:
                self.queried.set()
                assert self.go.wait(10)
        return out

    def restore(self) -> None:
        self.engine.memory.query = self.original
        del self.engine._compress


def sequential(engine: SemToken, conversation: str):
    first = engine.compress(CHUNKS, QUERY, rate=0.4, conversation_id=conversation)
    second = engine.compress(CHUNKS, QUERY, rate=0.4, conversation_id=conversation)
    assert texts(first) != texts(second)  # (the second drops what the first sent)
    return texts(first), texts(second), engine.memory.spans(conversation)


def test_two_calls_of_one_conversation_at_once_give_what_one_after_the_other_gives(shared):
    engine = shared  # (not named engine: that fixture name puts a test in the slow tier)
    first, second, spans = sequential(engine, "seq")
    pause = PauseAfterQuery(engine, "c")
    out: dict[str, list[str]] = {}
    a = threading.Thread(target=lambda: out.setdefault("a", texts(engine.compress(CHUNKS, QUERY, rate=0.4,
                                                                                  conversation_id="c"))))
    b = threading.Thread(target=lambda: out.setdefault("b", texts(engine.compress(CHUNKS, QUERY, rate=0.4,
                                                                                  conversation_id="c"))))
    try:
        a.start()
        assert pause.queried.wait(10)
        b.start()
        time.sleep(0.3)
        assert pause.calls == 1  # b waits for a: it has not read the conversation a is about to add to
        pause.go.set()
        a.join(10)
        b.join(10)
    finally:
        pause.go.set()
        pause.restore()
    assert (out["a"], out["b"]) == (first, second)
    assert engine.memory.spans("c") == spans


def test_a_conversation_forgotten_or_cleared_during_its_call_is_forgotten_after_it(shared):
    engine = shared  # (not named engine: that fixture name puts a test in the slow tier)
    _first, second, _spans = sequential(engine, "seq")
    for forget in (lambda: engine.forget_conversation("c"), engine.clear_caches):
        engine.compress(CHUNKS, QUERY, rate=0.4, conversation_id="c")  # the conversation received this
        pause = PauseAfterQuery(engine, "c")
        out: dict[str, list[str]] = {}
        call = threading.Thread(target=lambda out=out: out.setdefault("r", texts(engine.compress(
            CHUNKS, QUERY, rate=0.4, conversation_id="c"))))
        forgetting = threading.Thread(target=forget)
        try:
            call.start()
            assert pause.queried.wait(10)
            forgetting.start()
            time.sleep(0.3)
            assert forgetting.is_alive()  # it waits for the call in flight
            pause.go.set()
            call.join(10)
            forgetting.join(10)
        finally:
            pause.go.set()
            pause.restore()
        assert out["r"] == second  # the call saw the conversation as it was
        assert "c" not in engine.memory  # and what it sent is forgotten with the rest
        engine.compress(CHUNKS, QUERY, rate=0.4)  # (clear_caches emptied the caches: fill them again)


def test_a_cancelled_acompress_remembers_nothing_for_its_conversation(shared):
    engine = shared  # (not named engine: that fixture name puts a test in the slow tier)
    sent = engine.compress(CHUNKS, QUERY, rate=0.4, conversation_id="seq")

    async def cancel_midway(conversation, call):
        """Start ``call()``, cancel it once it has read ``conversation``, let its thread finish: what the
        conversation then holds."""
        pause = PauseAfterQuery(engine, conversation)
        task = asyncio.create_task(call())
        try:
            assert await asyncio.to_thread(pause.queried.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            pause.go.set()
        assert await asyncio.to_thread(pause.done.wait, 10)  # (the abandoned thread has finished its work)
        pause.restore()
        return engine.memory.spans(conversation)

    assert asyncio.run(cancel_midway("c", lambda: engine.acompress(CHUNKS, QUERY, rate=0.4,
                                                                    conversation_id="c"))) == 0
    # the call after a cancelled one sends what a first call sends; one that is awaited is remembered
    again = asyncio.run(engine.acompress(CHUNKS, QUERY, rate=0.4, conversation_id="c"))
    assert texts(again) == texts(sent) and engine.memory.spans("c") == engine.memory.spans("seq") > 0
    assert asyncio.run(cancel_midway("m", lambda: engine.acompress_many([CHUNKS], [QUERY], rate=0.4,
                                                                         conversation_ids=["m"]))) == 0


def test_prewarm_stores_its_own_encoding_seconds_beside_busy_threads(shared):
    engine = shared  # (not named engine: that fixture name puts a test in the slow tier)
    texts_ = [f"{c} {k}" for k in range(30) for c in CHUNKS[:2]]
    stop = threading.Event()

    def busy(seed: int) -> None:
        k = 0
        while not stop.is_set():
            engine.encoder.fingerprint([f"{c} busy {seed} {k}" for c in CHUNKS])
            k += 1

    threads = [threading.Thread(target=busy, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        assert engine.prewarm(texts_, batch_size=8) == len(texts_)
        wall = time.perf_counter() - started
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    from semtoken_rag.keys import cache_key

    stored = sum(engine.cache.memory.get_many([cache_key(t, engine._namespace)])[0].encode_seconds for t in texts_)
    # its own passes took at most its wall time; the encoder's running total also holds the busy threads'
    assert 0 < stored <= wall


def test_an_extra_made_by_two_calls_at_once_is_kept_and_counted_once(shared):
    engine = shared  # (not named engine: that fixture name puts a test in the slow tier)
    memo, spec = engine.analyses, engine._spec
    entry = memo._lru.get((spec.key, CHUNKS[0]))
    before = entry.nbytes
    both = threading.Barrier(2)
    got = []

    def make():
        both.wait(5)  # both calls are making it at once
        return [f"value of {threading.get_ident()}"]

    threads = [threading.Thread(target=lambda: got.append(memo.extra(spec, CHUNKS[0], entry, "probe", make)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got[0] is got[1] is entry.extras["probe"]
    from semtoken_rag.analysis import _sizeof

    assert entry.nbytes == before + _sizeof(got[0])


def test_redis_back_off_is_one_window_for_calls_that_fail_together():
    """Eight calls in flight when the store hangs: one outage, one window of ``backoff_seconds`` (it doubled on
    each of them, to 30 s). A local socket that accepts and never answers plays the hung server."""
    pytest.importorskip("redis")
    from semtoken_rag.keys import cache_key
    from semtoken_rag.redis_store import RedisStore

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(64)], daemon=True).start()
    store = RedisStore(f"redis://127.0.0.1:{server.getsockname()[1]}/0", namespace="ns", timeout_seconds=0.3,
                       backoff_seconds=0.5, max_backoff_seconds=30.0)
    together = threading.Barrier(8)

    def call():
        together.wait(5)
        store.get_many([cache_key("a chunk", "ns")])

    logging.getLogger("semtoken_rag.redis_store").disabled = True
    try:
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        logging.getLogger("semtoken_rag.redis_store").disabled = False
        server.close()
    assert store.stats().errors == 8  # every failed call is counted
    assert store._delay == 0.5 and not store.available
    time.sleep(0.6)  # the window is over: the next failure is a new one, and doubles it
    assert store.available


class GatedEncode:
    """Wraps ``engine.encoder.encode``: every call records its texts; the first waits for ``go`` (after
    ``entered`` is set) and, with ``fail``, raises once it goes on."""

    def __init__(self, engine: SemToken, fail: bool = False) -> None:
        self.original, self.fail, self.calls = engine.encoder.encode, fail, []
        self.entered, self.go = threading.Event(), threading.Event()
        engine.encoder.encode = self

    def __call__(self, texts, queries=()):
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.go.wait(30)
            if self.fail:
                raise RuntimeError("device lost")
        return self.original(texts, queries)


def _in_thread(fn, *args, **kwargs):
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    return worker, out


@pytest.mark.parametrize("overlap", ["same chunks", "some chunks"])
def test_a_chunk_being_encoded_by_a_concurrent_call_is_waited_for_not_encoded_again(tiny_encoder, overlap):
    """Two users whose retrievers return the same passages at once: one encoder pass for what they share."""
    eng = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    first, second = CHUNKS[:4], (CHUNKS[:4] if overlap == "same chunks" else CHUNKS[2:6])
    reference = SemToken(eng.config)
    want = [texts(reference.compress(c, QUERY, rate=0.4)) for c in (first, second)]
    gate = GatedEncode(eng)
    a, got_a = _in_thread(eng.compress, first, QUERY, rate=0.4)
    assert gate.entered.wait(30)  # the first call is inside its encoder pass
    b, got_b = _in_thread(eng.compress, second, QUERY, rate=0.4)
    deadline = time.monotonic() + 30  # the second call encodes what only it has, then waits for the rest
    while len(gate.calls) < (1 if overlap == "same chunks" else 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    gate.go.set()
    a.join(30)
    b.join(30)
    assert "error" not in got_a and "error" not in got_b
    assert [texts(got_a["result"]), texts(got_b["result"])] == want
    assert gate.calls[0] == first
    assert gate.calls[1:] == ([] if overlap == "same chunks" else [CHUNKS[4:6]])  # shared ones: encoded once
    assert got_b["result"].cache_hits == (4 if overlap == "same chunks" else 2)
    assert eng.preparer._in_flight == {}


def test_when_the_call_encoding_a_shared_chunk_fails_the_waiting_call_encodes_it_itself(tiny_encoder):
    eng = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    want = texts(SemToken(eng.config).compress(CHUNKS[:3], QUERY, rate=0.4))
    gate = GatedEncode(eng, fail=True)
    a, got_a = _in_thread(eng.compress, CHUNKS[:3], QUERY, rate=0.4)
    assert gate.entered.wait(30)
    b, got_b = _in_thread(eng.compress, CHUNKS[:3], QUERY, rate=0.4)
    time.sleep(0.2)  # (b waits for a's chunks)
    assert len(gate.calls) == 1
    gate.go.set()
    a.join(30)
    b.join(30)
    assert isinstance(got_a.get("error"), RuntimeError)  # the failing call still raises
    assert texts(got_b["result"]) == want and gate.calls[1] == CHUNKS[:3]
    assert eng.preparer._in_flight == {}


MANY = [" ".join(TINY_WORDS[(i * 11 + k) % len(TINY_WORDS)] for k in range(30)) + f" number {i}." for i in range(48)]


class GatedOn(GatedEncode):
    """GatedEncode whose gate holds only the first pass that encodes ``marker``."""

    def __init__(self, engine: SemToken, marker: str) -> None:
        super().__init__(engine)
        self.marker = marker

    def __call__(self, texts, queries=()):
        self.calls.append(list(texts))
        if self.marker in texts and not self.entered.is_set():
            self.entered.set()
            assert self.go.wait(30)
        return self.original(texts, queries)


def _tiny(tiny_encoder, **fields) -> SemToken:
    return SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8, **fields))


def test_a_small_call_does_not_wait_for_a_much_larger_pass_it_shares_a_chunk_with(tiny_encoder):
    """A one-chunk call sharing a passage with a 48-passage compress_many encodes it itself: waiting for the
    whole pass took 1.9 s against 38 ms (240 passages, real encoder)."""
    eng = _tiny(tiny_encoder)
    gate = GatedOn(eng, MANY[0])
    big, got_big = _in_thread(eng.compress_many, [MANY[:24], MANY[24:]], [QUERY, QUERY], rate=0.4)
    assert gate.entered.wait(30)
    small, got_small = _in_thread(eng.compress, [MANY[5]], QUERY, rate=0.4)
    small.join(30)
    assert not small.is_alive() and "error" not in got_small  # done while the big pass is held
    assert got_small["result"].cache_hits == 0
    gate.go.set()
    big.join(30)
    assert "error" not in got_big and eng.preparer._in_flight == {}


def test_the_micro_batchers_worker_never_waits_for_another_calls_pass(tiny_encoder):
    """compress_many does not go through the micro-batcher: its pass must not hold the batcher's worker, and
    with it every call queued behind, even calls that share nothing with it."""
    eng = _tiny(tiny_encoder, batch_window_ms=5)
    gate = GatedOn(eng, MANY[0])
    big, got_big = _in_thread(eng.compress_many, [MANY[:8]], [QUERY], rate=0.4)
    assert gate.entered.wait(30)
    sharing, got_sharing = _in_thread(eng.compress, MANY[:2], QUERY, rate=0.4)
    other, got_other = _in_thread(eng.compress, MANY[40:42], QUERY, rate=0.4)
    sharing.join(30)
    other.join(30)
    assert not sharing.is_alive() and not other.is_alive()
    assert "error" not in got_sharing and "error" not in got_other
    gate.go.set()
    big.join(30)
    assert "error" not in got_big and eng.preparer._in_flight == {}
    eng.close()


def test_a_chunk_another_call_finished_between_lookup_and_claim_is_not_encoded_again(tiny_encoder):
    """(The micro-batcher hands prepare the lookups its calls made when they queued: by the time the batch
    runs, the call before may have encoded and cached those chunks.)"""
    from semtoken_rag.prepare import Prepared

    eng = _tiny(tiny_encoder)
    eng.compress(MANY[:3], QUERY, rate=0.4)  # cached now
    stale = Prepared(missed=set(MANY[:3]))  # what a lookup made before that call finished said
    gate = GatedEncode(eng)
    gate.go.set()
    got = eng.preparer.prepare([(MANY[:4], None)], [stale])
    assert gate.calls == [[MANY[3]]] and got.cached == set(MANY[:3])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_does_not_wait_for_the_parents_chunks_in_flight(tiny_encoder):
    import os

    eng = _tiny(tiny_encoder)
    gate = GatedEncode(eng)
    call, got = _in_thread(eng.compress, MANY[:3], QUERY, rate=0.4)
    assert gate.entered.wait(30)
    assert len(eng.preparer._in_flight) == 3
    pid = os.fork()
    if pid == 0:  # (its claims are made and released without torch: a forked child's torch wants care)
        ok = False
        try:
            mine, theirs, also = eng.preparer._claim(MANY[:3])
            ok = (eng.preparer._in_flight.keys() == set(MANY[:3]) and mine == MANY[:3] and not theirs
                  and not also)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    gate.go.set()
    call.join(30)
    assert os.WEXITSTATUS(status) == 0 and "error" not in got and eng.preparer._in_flight == {}


def test_loading_an_encoder_leaves_torchs_default_dtype_alone(tiny_encoder):
    """Loading straight into bfloat16 set torch's default dtype for the whole process while it ran: a call in
    another thread then pooled in bfloat16, or failed (5-8 of 130 calls during 5 engine builds)."""
    import torch

    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(torch.get_default_dtype())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            eng = _tiny(tiny_encoder, dtype="bfloat16")
    finally:
        stop.set()
        watcher.join()
    assert eng.encoder.dtype == torch.bfloat16 and next(eng.encoder.model.parameters()).dtype == torch.bfloat16
    assert seen == {torch.float32}
