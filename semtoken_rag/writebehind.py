"""Write-behind: a store's writes on a background thread, off the calls that make the entries.

A cold call's new fingerprints go to memory at once, and to the backend (``cache_dir`` files, Redis)
from here: on 20 NQ passages the backend write took 2.3 ms (Redis on loopback) to 5.8 ms (``cache_dir``)
of the call's time, measured side by side on 2026-12-07. One worker thread per cache writes everything
queued so far in one backend call, so concurrent calls' writes share a round trip; it stops when idle
and starts again on the next write.

What is queued is still served: :meth:`WriteBehind.pending` answers a read of a key not yet written.
:meth:`WriteBehind.flush` waits until everything queued is written; the cache's ``close`` flushes, and
at interpreter exit every writer is flushed (each for at most ``EXIT_FLUSH_SECONDS``). A forked child
drops what its parent had queued (the parent writes it) and starts its own worker when it writes.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

from .fileformat import CacheEntry

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

    def _init_state(self) -> None:
        self._cond = threading.Condition()
        self._queued: dict[str, CacheEntry] = {}  # (insertion order: the order of the writes)
        self._writing: dict[str, CacheEntry] = {}  # the batch the worker is writing
        self._bytes = 0  # of both
        self._worker: threading.Thread | None = None

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        """Queue ``items``; waits only while more than ``max_pending_bytes`` are queued or being written."""
        items = list(items)
        if not items:
            return
        size = sum(e.nbytes for _, e in items)
        with self._cond:
            self._cond.wait_for(lambda: self._bytes == 0 or self._bytes + size <= self._max_bytes)
            for key, entry in items:
                old = self._queued.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._queued[key] = entry
                self._bytes += entry.nbytes
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="semtoken-rag-write-behind", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def pending(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """The entry queued or being written for each key, else ``None``."""
        with self._cond:
            return [self._queued.get(k) or self._writing.get(k) for k in keys]

    def pending_count(self) -> int:
        with self._cond:
            return len(self._queued) + len(self._writing)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call is written; ``False`` if ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued and not self._writing, timeout)

    def discard(self) -> None:
        """Drop what is queued and wait for the batch being written (a store cleared after this call
        gets no entry queued before it)."""
        with self._cond:
            self._bytes -= sum(e.nbytes for e in self._queued.values())
            self._queued.clear()
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._writing)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queued and not self._cond.wait_for(lambda: bool(self._queued), self._idle):
                    self._worker = None  # (under the lock: the next put_many starts another)
                    self._cond.notify_all()
                    return
                batch, self._queued = self._queued, {}
                self._writing = batch
            try:
                self._write(list(batch.items()))
            except Exception:  # (a write fault must not kill the worker and strand the queue)
                logger.exception("fingerprint store write of %d entries failed; they stay in memory only", len(batch))
            finally:
                with self._cond:
                    self._writing = {}
                    self._bytes -= sum(e.nbytes for e in batch.values())
                    self._cond.notify_all()

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


def _reset_in_child() -> None:
    for writer in list(_writers):
        writer._after_fork()


atexit.register(_flush_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
