"""MicroBatcher with real threads and asyncio: coalescing, routing, errors, sessions, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from semtoken_rag.batching import MicroBatcher


class Recorder:
    """A batch function that records the batches it saw; fails on items listed in ``bad``."""

    def __init__(self, bad: tuple = (), delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.bad, self.delay = set(bad), delay
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        for x in items:
            if x in self.bad:
                raise ValueError(f"bad item {x}")
        return [("out", x) for x in items]


def run_threads(n: int, target) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a caller never returned"


def test_threads_coalesce_and_each_gets_its_own_result():
    fn = Recorder()
    out: dict[int, object] = {}
    barrier = threading.Barrier(32)
    with MicroBatcher(fn, window_ms=5000) as mb:  # ends early once every session has submitted
        def work(i):
            with mb.session() as s:
                barrier.wait()
                out[i] = mb.submit(i, s)
        run_threads(32, work)
    assert out == {i: ("out", i) for i in range(32)}
    seen = sorted(x for b in fn.batches for x in b)
    assert seen == list(range(32))  # nothing lost, nothing served twice
    assert len(fn.batches) == 1  # all 32 announced before any submitted
    assert mb.items == 32


def test_lone_session_does_not_wait_for_the_window():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=5000) as mb:
        started = time.monotonic()
        with mb.session() as s:
            assert mb.submit("a", s) == ("out", "a")
        assert time.monotonic() - started < 2.5  # the 5 s window was not waited for


def test_session_left_without_submitting_releases_the_wait():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=5000) as mb:
        idle = mb.session()
        idle.__enter__()  # an announced caller that will never submit (e.g. everything was cached)
        result: list = []
        t = threading.Thread(target=lambda: result.append(mb.submit("x")))
        t.start()
        time.sleep(0.2)
        idle.__exit__(None, None, None)
        t.join(timeout=3)
        assert result == [("out", "x")]


def test_window_bounds_the_wait_when_a_session_never_submits():
    fn = Recorder()
    with MicroBatcher(fn, window_ms=100) as mb, mb.session():
        started = time.monotonic()
        assert mb.submit("x") == ("out", "x")
        assert time.monotonic() - started < 2.0


def test_max_batch_is_respected():
    fn = Recorder(delay=0.05)
    barrier = threading.Barrier(20)
    with MicroBatcher(fn, window_ms=100, max_batch=4) as mb:
        def work(i):
            barrier.wait()
            assert mb.submit(i) == ("out", i)
        run_threads(20, work)
    assert max(len(b) for b in fn.batches) <= 4
    assert sorted(x for b in fn.batches for x in b) == list(range(20))


def test_exception_reaches_only_its_caller():
    fn = Recorder(bad=(3, 7))
    out: dict[int, object] = {}
    barrier = threading.Barrier(10)
    with MicroBatcher(fn, window_ms=200) as mb:
        def work(i):
            barrier.wait()
            try:
                out[i] = mb.submit(i)
            except ValueError as e:
                out[i] = str(e)
        run_threads(10, work)
    assert out[3] == "bad item 3" and out[7] == "bad item 7"
    assert all(out[i] == ("out", i) for i in range(10) if i not in (3, 7))


def test_wrong_number_of_results_is_an_error_for_the_callers():
    with MicroBatcher(lambda items: [], window_ms=0) as mb, \
            pytest.raises(RuntimeError, match="returned 0 results for 1 item"):
        mb.submit(1)


def test_asyncio_callers_coalesce():
    fn = Recorder()

    async def main():
        with MicroBatcher(fn, window_ms=200) as mb:
            async def one(i):
                with mb.session() as s:
                    await asyncio.sleep(0)
                    return await mb.asubmit(i, s)
            return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(main()) == [("out", i) for i in range(16)]
    assert len(fn.batches) < 16


def test_asyncio_exception_routed():
    async def main():
        with MicroBatcher(Recorder(bad=(1,)), window_ms=50) as mb:
            return await asyncio.gather(mb.asubmit(0), mb.asubmit(1), return_exceptions=True)

    ok, err = asyncio.run(main())
    assert ok == ("out", 0) and isinstance(err, ValueError)


def test_close_serves_queued_items_then_refuses():
    fn = Recorder(delay=0.1)
    mb = MicroBatcher(fn, window_ms=0)
    futures = [mb.submit_future(i) for i in range(5)]
    mb.close(timeout=10)
    assert [f.result(timeout=0) for f in futures] == [("out", i) for i in range(5)]
    with pytest.raises(RuntimeError, match="closed"):
        mb.submit(9)
    with pytest.raises(RuntimeError, match="closed"), mb.session():
        pass
    mb.close()  # idempotent


def test_reentrant_submit_from_the_batch_function_does_not_deadlock():
    holder: dict = {}

    def fn(items):
        if items == ["outer"]:
            return [holder["mb"].submit("inner")]
        return [x.upper() for x in items]

    with MicroBatcher(fn, window_ms=0) as mb:
        holder["mb"] = mb
        assert mb.submit("outer") == "INNER"


@pytest.mark.parametrize("kwargs, match", [
    ({"window_ms": -1}, "window_ms"), ({"window_ms": float("nan")}, "window_ms"),
    ({"window_ms": True}, "window_ms"), ({"max_batch": 0}, "max_batch"), ({"max_batch": 2.5}, "max_batch"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MicroBatcher(lambda xs: xs, **kwargs)
    with pytest.raises(TypeError, match="callable"):
        MicroBatcher(42)
