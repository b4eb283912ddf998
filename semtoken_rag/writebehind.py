"""Write-behind: a store's writes on a background thread, off the calls that make the entries.

A cold call's new fingerprints go to memory at once, and to the backend (``cache_dir`` files, Redis)
from here: on 20 NQ passages the backend write took 2.3 ms (Redis on loopback) to 5.8 ms (``cache_dir``)
of the call's time, measured side by side on 2026-12-07. One worker thread per cache writes everything
queued so far in one backend call, so concurrent calls' writes share a round trip; it stops when idle
and starts again on the next write.

What is queued is still served: :meth:`WriteBehind.pending` answers a read of a key not yet written.
:meth:`WriteBehind.flush` waits until everything queued before it is written; the cache's ``close``
flushes, and at interpreter exit (and at the end of a ``multiprocessing`` child, which skips ``atexit``)
every writer is flushed, each for at most ``EXIT_FLUSH_SECONDS``. A process killed by a signal it does not
handle (SIGTERM without a handler, SIGKILL) loses what is queued: its next run encodes those chunks again.
A forked child drops what its parent had queued (the parent writes it) and starts its own worker when it
writes.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import util as _mp_util

from .fileformat import CacheEntry
from .forksafe import renew_after_fork

logger = logging.getLogger(__name__)

#: bytes of entries queued or being written above which a writer's caller waits (back-pressure: a
#: pre-warm that encodes faster than its store takes the entries waits for it, in bounded memory)
DEFAULT_MAX_PENDING_BYTES = 64 << 20
#: a worker with nothing to write for this long stops (a later write starts another)
IDLE_SECONDS = 2.0
#: how long interpreter exit waits for each writer to finish
EXIT_FLUSH_SECONDS = 30.0

_writers: weakref.WeakSet[WriteBehind] = weakref.WeakSet()


class WriteBehind:
    """Entries queued by :meth:`put_many` and written by ``write(items)`` on a worker thread, in batches.

    ``write`` must not raise (the cache's backend call counts and logs faults); if it does, the batch is
    logged and dropped. A key queued again before it is written is written once, with its last entry.

    >>> written = []
    >>> wb = WriteBehind(written.extend)
    >>> wb.put_many([("k1", CacheEntry({}, 0.0))])
    >>> wb.flush(timeout=10), [k for k, _ in written]
    (True, ['k1'])
    """

    def __init__(self, write: Callable[[list[tuple[str, CacheEntry]]], object], *,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES, idle_seconds: float = IDLE_SECONDS) -> None:
        self._write = write
        self._max_bytes = max_pending_bytes
        self._idle = idle_seconds
        self._init_state()
        _writers.add(self)
        renew_after_fork(self)

    def _init_state(self) -> None:
        self._cond = threading.Condition()
        self._queued: dict[str, CacheEntry] = {}  # (insertion order: the order of the writes)
        self._writing: dict[str, CacheEntry] = {}  # the batch the worker is writing
        self._bytes = 0  # of both
        self._worker: threading.Thread | None = None
        self._queued_seq = 0  # put_many calls so far
        self._done_seq = 0  # every put_many call up to this one is written (or discarded)

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        """Queue ``items``; waits only while more than ``max_pending_bytes`` are queued or being written.
        Where no worker thread can be started (thread limits; at interpreter exit), writes them itself."""
        items = list(items)
        if not items:
            return
        size = sum(e.nbytes for _, e in items)
        inline = False
        with self._cond:
            self._cond.wait_for(lambda: self._bytes == 0 or self._bytes + size <= self._max_bytes)
            for key, entry in items:
                old = self._queued.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._queued[key] = entry
                self._bytes += entry.nbytes
            self._queued_seq += 1
            if self._worker is None:
                worker = threading.Thread(target=self._run, name="semtoken-rag-write-behind", daemon=True)
                try:
                    worker.start()
                except RuntimeError:  # ("can't start new thread"; at exit on Python 3.12)
                    inline = True
                else:
                    self._worker = worker
            self._cond.notify_all()
        if inline:
            taken = self._take()
            if taken is not None:
                self._write_batch(*taken)

    def pending(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """The entry queued or being written for each key, else ``None``."""
        with self._cond:
            return [self._queued.get(k) or self._writing.get(k) for k in keys]

    def pending_count(self) -> int:
        with self._cond:
            return len(self._queued) + len(self._writing)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call is written (what other threads queue meanwhile
        is not waited for); ``False`` if ``timeout`` ran out."""
        with self._cond:
            target = self._queued_seq
            return self._cond.wait_for(lambda: self._done_seq >= target, timeout)

    def discard(self) -> None:
        """Drop what is queued and wait for the batch being written (a store cleared after this call
        gets no entry queued before it)."""
        with self._cond:
            self._bytes -= sum(e.nbytes for e in self._queued.values())
            self._queued.clear()
            dropped = self._queued_seq
            self._cond.wait_for(lambda: not self._writing)
            self._done_seq = max(self._done_seq, dropped)
            self._cond.notify_all()

    def _take(self) -> tuple[dict[str, CacheEntry], int] | None:
        """The queue as the next batch to write, and the last put_many call it holds (None: empty)."""
        with self._cond:
            if not self._queued:
                return None
            batch, self._queued = self._queued, {}
            self._writing = batch
            return batch, self._queued_seq

    def _write_batch(self, batch: dict[str, CacheEntry], upto: int) -> None:
        try:
            self._write(list(batch.items()))
        except Exception:  # (a write fault must not kill the worker and strand the queue)
            logger.exception("fingerprint store write of %d entries failed; they stay in memory only", len(batch))
        finally:
            with self._cond:
                self._writing = {}
                self._bytes -= sum(e.nbytes for e in batch.values())
                self._done_seq = max(self._done_seq, upto)
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queued and not self._cond.wait_for(lambda: bool(self._queued), self._idle):
                    self._worker = None  # (under the lock: the next put_many starts another)
                    self._cond.notify_all()
                    return
            taken = self._take()
            if taken is not None:
                self._write_batch(*taken)
            taken = None  # (the batch is not kept alive while the worker waits)

    def _after_fork(self) -> None:
        """In a forked child: the parent's queue and worker are the parent's."""
        self._init_state()


def _flush_all_at_exit() -> None:
    for writer in list(_writers):
        started = time.monotonic()
        if not writer.flush(timeout=EXIT_FLUSH_SECONDS):
            logger.warning("fingerprint store: %d entries not written after %.0f s at exit; they are lost "
                           "(the next process encodes those chunks again)", writer.pending_count(),
                           time.monotonic() - started)


class _Anchor:
    """(What multiprocessing's after-fork registry holds weakly: alive as long as this module.)"""


def _flush_at_process_end(_anchor: object = None) -> None:
    """A multiprocessing child (fork, forkserver, spawn) ends with ``os._exit``: no ``atexit`` there, but
    the finalizers registered in it run. It clears those it inherited when it starts, then calls its
    after-fork hooks: this one registers the flush again."""
    _mp_util.Finalize(None, _flush_all_at_exit, exitpriority=100)


_ANCHOR = _Anchor()
atexit.register(_flush_all_at_exit)
_flush_at_process_end()
_mp_util.register_after_fork(_ANCHOR, _flush_at_process_end)
