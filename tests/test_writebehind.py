"""Write-behind: a store's writes on a worker thread, off the calls (unit tier: no real encoder).

Races are forced, not waited for: the backend's writes block on an Event until a test lets them go.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.fileformat import CacheEntry
from semtoken_rag.store import FingerprintStore, LayeredCache, MemoryStore, StoreStats
from semtoken_rag.writebehind import WriteBehind


def entry(value: int, size: int = 16) -> CacheEntry:
    return CacheEntry({"fingerprints": np.full((size, 4), value, np.float16)}, 0.01)


def key(i: int) -> str:
    return f"{i:064x}"


class GatedStore(FingerprintStore):
    """A MemoryStore whose writes wait for ``gate`` and are recorded, one list per put_many call."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gate = threading.Event()
        self.writing = threading.Event()  # set when a write is waiting at the gate
        self.calls: list[list[str]] = []
        self.fail = False

    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        return self.inner.get_many(keys)

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        items = list(items)
        self.writing.set()
        assert self.gate.wait(30), "test forgot to open the gate"
        self.calls.append([k for k, _ in items])
        if self.fail:
            raise OSError("disk on fire")
        self.inner.put_many(items)

    def stats(self) -> StoreStats:
        return self.inner.stats()

    def clear(self) -> None:
        self.inner.clear()


def test_put_returns_before_the_write_and_what_is_queued_is_served():
    store = GatedStore()
    cache = LayeredCache(MemoryStore(0), store, write_behind=True)  # (no memory: only the queue answers)
    cache.put_many([(key(1), entry(1))])  # returns although the write waits at the gate
    assert store.writing.wait(10) and store.calls == []
    got = cache.get_many([key(1), key(2)])
    assert got[0] is not None and np.array_equal(got[0]["fingerprints"], entry(1)["fingerprints"])
    assert got[1] is None
    assert cache.contains_many([key(1), key(2)]) == [True, False] and key(1) in cache
    assert cache.flush(timeout=0.05) is False  # still waiting at the gate
    store.gate.set()
    assert cache.flush(timeout=10) is True
    assert store.calls == [[key(1)]] and store.inner.get(key(1)) is not None
    s = cache.stats()
    assert (s.hits, s.misses, s.store_errors) == (1, 1, 0)


def test_writes_queued_meanwhile_go_in_one_backend_call_and_a_key_queued_twice_once():
    store = GatedStore()
    cache = LayeredCache(MemoryStore(), store, write_behind=True)
    cache.put_many([(key(1), entry(1))])
    assert store.writing.wait(10)  # the worker holds the first batch at the gate
    cache.put_many([(key(2), entry(2)), (key(3), entry(3))])
    cache.put_many([(key(2), entry(22))])  # queued again before it was written: the last one counts
    store.gate.set()
    assert cache.flush(timeout=10)
    assert store.calls == [[key(1)], [key(3), key(2)]]  # (in the order of their last puts)
    assert store.inner.get(key(2))["fingerprints"][0, 0] == 22


def test_a_full_queue_makes_the_caller_wait_for_the_worker():
    written = []
    gate = threading.Event()

    def write(items):
        assert gate.wait(30)
        written.extend(k for k, _ in items)

    one = entry(1).nbytes
    wb = WriteBehind(write, max_pending_bytes=2 * one)
    wb.put_many([(key(1), entry(1)), (key(2), entry(2))])  # the bound: a third entry must wait
    done = threading.Event()
    caller = threading.Thread(target=lambda: (wb.put_many([(key(3), entry(3))]), done.set()))
    caller.start()
    assert not done.wait(0.3)  # held back while the queue is full
    gate.set()
    assert done.wait(10) and wb.flush(timeout=10)
    caller.join()
    assert written == [key(1), key(2), key(3)]


def test_a_failing_backend_is_counted_and_the_worker_goes_on(caplog):
    store = GatedStore()
    store.gate.set()
    store.fail = True
    cache = LayeredCache(MemoryStore(), store, write_behind=True)
    with caplog.at_level("WARNING", logger="semtoken_rag"):
        cache.put_many([(key(1), entry(1))])
        assert cache.flush(timeout=10)
        cache.put_many([(key(2), entry(2))])
        assert cache.flush(timeout=10)
    assert cache.stats().store_errors == 2 and len(store.calls) == 2
    assert sum("disk on fire" in r.getMessage() for r in caplog.records) == 1  # (logged once)
    store.fail = False
    cache.put_many([(key(3), entry(3))])
    assert cache.flush(timeout=10) and store.inner.get(key(3)) is not None


def test_a_write_callback_that_raises_loses_its_batch_only():
    calls = []

    def write(items):
        calls.append([k for k, _ in items])
        if len(calls) == 1:
            raise RuntimeError("bug")

    wb = WriteBehind(write)
    wb.put_many([(key(1), entry(1))])
    assert wb.flush(timeout=10)
    wb.put_many([(key(2), entry(2))])
    assert wb.flush(timeout=10) and calls == [[key(1)], [key(2)]]


def test_clearing_the_store_drops_what_is_queued():
    store = GatedStore()
    cache = LayeredCache(MemoryStore(), store, write_behind=True)
    cache.put_many([(key(1), entry(1))])
    assert store.writing.wait(10)
    cache.put_many([(key(2), entry(2))])  # queued behind the batch at the gate
    clearing = threading.Thread(target=lambda: cache.clear(disk=True))
    clearing.start()
    time.sleep(0.1)
    assert clearing.is_alive()  # waits for the batch being written, so that it lands before the clear
    store.gate.set()
    clearing.join(10)
    assert cache.flush(timeout=10)
    assert store.calls == [[key(1)]] and len(store.inner) == 0  # key 2 was dropped, key 1 cleared


def test_the_worker_stops_when_idle_and_starts_again():
    written = []
    wb = WriteBehind(lambda items: written.extend(k for k, _ in items), idle_seconds=0.05)
    wb.put_many([(key(1), entry(1))])
    assert wb.flush(timeout=10)
    first = wb._worker
    deadline = time.monotonic() + 10
    while wb._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wb._worker is None and not first.is_alive()
    wb.put_many([(key(2), entry(2))])
    assert wb.flush(timeout=10) and written == [key(1), key(2)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_its_own_entries_not_its_parents():
    store = GatedStore()
    cache = LayeredCache(MemoryStore(), store, write_behind=True)
    cache.put_many([(key(1), entry(1))])
    assert store.writing.wait(10)  # the parent's worker is mid-write when the child is forked
    cache.put_many([(key(2), entry(2))])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the parent's queue is the parent's to write
        status = 1
        try:
            store.calls.clear()
            store.gate.set()
            cache.put_many([(key(3), entry(3))])
            ok = cache.flush(timeout=10)
            os.write(write, repr((ok, store.calls)).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        said = f.read()
    assert status == 0 and said == repr((True, [[key(3)]]))
    store.gate.set()
    assert cache.flush(timeout=10) and store.calls == [[key(1)], [key(2)]]


def test_the_process_exit_writes_what_is_queued(tmp_path):
    """A command that compresses and exits at once (the CLI, a batch job) still leaves its entries."""
    script = textwrap.dedent(f"""
        import time
        import numpy as np
        from semtoken_rag.diskstore import DirectoryStore
        from semtoken_rag.fileformat import CacheEntry
        from semtoken_rag.store import LayeredCache, MemoryStore

        class Slow(DirectoryStore):
            def put_many(self, items):
                time.sleep(0.5)
                super().put_many(items)

        cache = LayeredCache(MemoryStore(), Slow({str(tmp_path)!r}), write_behind=True)
        cache.put_many([(f"{{i:064x}}", CacheEntry({{"fingerprints": np.ones((3, 4), np.float16)}}, 0.1))
                        for i in range(5)])
        print(len(list(__import__("pathlib").Path({str(tmp_path)!r}).rglob("*.stfp"))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"  # none written when the script's last line ran
    assert len(list(tmp_path.rglob("*.stfp"))) == 5  # all written before the process ended


def test_engine_writes_behind_when_asked_and_by_default_on_cuda_only(tiny_encoder, tmp_path):
    chunks = ["the nobel prize in physics was first awarded in 1901.", "a banana is a fruit. it is yellow."]
    fields = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8}
    for asked, behind in ((True, True), (False, False), (None, False)):  # (None on CPU: in the call)
        eng = SemToken(SemTokenConfig(**fields, cache_dir=tmp_path / str(asked), store_write_behind=asked))
        backend = eng.cache.backend
        gate, real = threading.Event(), backend.put_many
        backend.put_many = lambda items, real=real, gate=gate: (gate.wait(30), real(items))
        result: list = []
        call = threading.Thread(target=lambda e=eng, out=result: out.append(e.compress(chunks, "nobel", rate=0.5)))
        call.start()
        call.join(timeout=10 if behind else 0.5)
        assert bool(result) is behind  # with write-behind the call returned; without, it waits for the write
        assert eng.compress(chunks, "nobel", rate=0.5).cache_hits == 2 if behind else True
        gate.set()
        call.join(30)
        eng.close()  # waits for the write
        assert len(list((tmp_path / str(asked)).rglob("*.stfp"))) == 2
        assert SemToken(SemTokenConfig(**fields, cache_dir=tmp_path / str(asked))).compress(
            chunks, "nobel", rate=0.5).cache_hits == 2


def test_prewarm_returns_once_the_store_has_everything(tiny_encoder, tmp_path):
    texts = [f"passage number {i} about the nobel prize in physics." for i in range(6)]
    fields = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8}
    eng = SemToken(SemTokenConfig(**fields, cache_dir=tmp_path, store_write_behind=True))
    real = eng.cache.backend.put_many
    eng.cache.backend.put_many = lambda items: (time.sleep(0.2), real(items))
    assert eng.prewarm(texts, batch_size=2) == 6
    assert len(list(tmp_path.rglob("*.stfp"))) == 6


def test_flush_waits_for_what_was_queued_before_it_not_for_other_threads_writes():
    """A thread writing without pause (another engine on the same store) must not keep close() or prewarm()
    waiting: flush waits for the entries queued before it only."""
    written, stop = [], threading.Event()

    def write(items):
        time.sleep(0.02)
        written.extend(k for k, _ in items)

    wb = WriteBehind(write)

    def busy():
        i = 100
        while not stop.is_set():
            wb.put_many([(key(i), entry(i))])
            i += 1
            time.sleep(0.002)

    other = threading.Thread(target=busy)
    other.start()
    try:
        time.sleep(0.05)
        wb.put_many([(key(1), entry(1))])
        assert wb.flush(timeout=5) is True and key(1) in written
    finally:
        stop.set()
        other.join()
    assert wb.flush(timeout=10)


def test_a_thread_that_cannot_start_leaves_the_writes_to_the_caller(monkeypatch):
    """Thread limits (or an atexit put on Python 3.12) make Thread.start raise: the put writes its entries
    itself, raises nothing, and the next put starts a worker again."""
    written = []
    wb = WriteBehind(lambda items: written.extend(k for k, _ in items))
    real, failed = threading.Thread.start, []

    def start_once(self):
        if not failed and self.name == "semtoken-rag-write-behind":
            failed.append(self)
            raise RuntimeError("can't start new thread")
        return real(self)

    monkeypatch.setattr(threading.Thread, "start", start_once)
    wb.put_many([(key(1), entry(1))])
    assert failed and written == [key(1)] and wb.flush(timeout=1)
    wb.put_many([(key(2), entry(2))])
    assert wb.flush(timeout=10) and written == [key(1), key(2)]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_multiprocessing_child_writes_its_queue_before_it_ends(tmp_path, method):
    """Pool and Process children end with os._exit, which skips atexit: their queue is flushed by a
    multiprocessing finalizer instead."""
    import multiprocessing as mp

    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} here")
    child = mp.get_context(method).Process(target=_queue_and_return, args=(str(tmp_path),))
    child.start()
    child.join(120)
    assert child.exitcode == 0 and len(list(tmp_path.rglob("*.stfp"))) == 5


def _queue_and_return(folder: str) -> None:
    from semtoken_rag.diskstore import DirectoryStore

    class Slow(DirectoryStore):
        def put_many(self, items):
            time.sleep(0.3)
            super().put_many(items)

    cache = LayeredCache(MemoryStore(), Slow(folder), write_behind=True)
    cache.put_many([(key(i), entry(i)) for i in range(5)])  # (and return at once)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_background_prune_can_prune(tmp_path):
    """The prune holds its lock for its whole scan: a child forked meanwhile must not inherit it held."""
    from semtoken_rag.diskstore import DirectoryStore

    store = DirectoryStore(tmp_path, max_disk_bytes=10_000, prune_in_background=True)
    gate, scanning, real = threading.Event(), threading.Event(), store._scan
    store._scan = lambda: (scanning.set(), gate.wait(30), real())[2]
    store.put(key(0), entry(0, size=200))  # the first write scans, in the background: held at the gate
    assert scanning.wait(10)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            store._scan = real
            for i in range(1, 12):
                store.put(key(i), entry(i, size=200))
                store.wait_for_prune(timeout=10)
            status = 0 if store.disk_bytes() <= 10_000 else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    gate.set()
    assert store.wait_for_prune(timeout=30)
    assert os.WEXITSTATUS(status) == 0
