"""Fingerprint stores: a small interface, two backends, and the layered cache the engine uses.

* :class:`FingerprintStore`: the interface. One ``get_many`` per call (a Redis backend pipelines it),
  ``put_many``, ``stats``, ``clear``, ``close``.
* :class:`MemoryStore`: an in-process LRU bounded in bytes.
* :class:`~semtoken_rag.diskstore.DirectoryStore` (its own module): files in a shared directory.
* :class:`LayeredCache`: a :class:`MemoryStore` in front of an optional backend. A backend that
  raises is logged once, counted in ``store_errors`` and treated as a miss: a store fault never fails a
  call. An entry the caller's check rejects is counted, logged once and treated as a miss.

Storage layer: imports only numpy, the standard library and its siblings.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileformat import CacheEntry, has_array
from .keys import check_key, is_key
from .lru import ByteLRU
from .writebehind import WriteBehind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreStats:
    """Counters of one :class:`FingerprintStore` backend."""

    entries: int = 0  #: entries held (in memory; 0 where unknown without a scan)
    bytes: int = 0  #: bytes held in memory
    evictions: int = 0  #: entries dropped to honour a byte bound (a directory's: files pruned)
    writes: int = 0  #: entries written to persistent storage
    corrupt: int = 0  #: stored values that failed to decode (or were not regular files)
    errors: int = 0  #: I/O failures (reads other than "not found", writes)


@dataclass(frozen=True)
class CacheStats:
    """What the engine's caches hold and what they saved (see ``SemToken.cache_stats()``).

    ``hits`` counts memory and backend hits; ``disk_hits`` the part served by the backend (a directory
    or another store). ``corrupt_entries`` failed to decode, ``invalid_entries`` decoded but did not
    fit their chunk; both were misses. ``store_errors`` counts backend faults, each a miss too.
    ``analyses`` and ``analysis_bytes``: chunks whose query-independent analysis the engine keeps
    (``analysis_memo_max_bytes``) and the bytes it charges for them. ``disk_pruned``: entry files this
    process deleted from ``cache_dir`` (or a directory store) to keep it under ``cache_max_disk_bytes``.
    """

    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    evictions: int = 0
    entries: int = 0
    memory_bytes: int = 0
    disk_writes: int = 0
    corrupt_entries: int = 0
    invalid_entries: int = 0
    store_errors: int = 0
    encoder_seconds_saved: float = 0.0
    conversations: int = 0
    conversation_bytes: int = 0
    queries: int = 0
    query_bytes: int = 0
    analyses: int = 0
    analysis_bytes: int = 0
    disk_pruned: int = 0


class FingerprintStore(abc.ABC):
    """Key -> :class:`CacheEntry` storage. Implementations are thread-safe.

    ``get_many`` answers a whole call in one round trip; a missing (or unreadable) entry is ``None``.
    Backends may raise on faults: :class:`LayeredCache` turns that into misses.
    """

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """One entry or ``None`` per key, in order."""

    @abc.abstractmethod
    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        """Store every ``(key, entry)``."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop every entry."""

    def close(self) -> None:
        """Release connections or handles (nothing by default)."""

    def get(self, key: str) -> CacheEntry | None:
        """``get_many([key])[0]``."""
        return self.get_many([key])[0]

    def put(self, key: str, entry: CacheEntry) -> None:
        """``put_many([(key, entry)])``."""
        self.put_many([(key, entry)])

    def has_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored (for pre-warming: skip what is there). Backends may answer cheaper."""
        return [e is not None for e in self.get_many(keys)]

    def has_arrays(self, keys: Sequence[str], prefix: str) -> list[bool]:
        """Which keys hold an entry with an array whose name starts with ``prefix`` (for pre-warming: the
        stored entries that lack the current analysis). Backends may answer cheaper, from an entry's first
        bytes (:func:`~semtoken_rag.fileformat.array_names`): such an answer may be ``False`` for an entry
        whose array lies past them, never ``True`` for one without it, damage aside."""
        return [e is not None and has_array(e.arrays, prefix) for e in self.get_many(keys)]


class MemoryStore(FingerprintStore):
    """In-process store: LRU bounded in bytes (``CacheEntry.nbytes``); ``max_bytes=0`` keeps nothing.

    >>> import numpy as np
    >>> store = MemoryStore(max_bytes=1 << 20)
    >>> store.put("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}))
    >>> [e is not None for e in store.get_many(["abcd1234", "dcba4321"])]
    [True, False]
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self._lru: ByteLRU[CacheEntry] = ByteLRU(max_bytes, sizeof=lambda e: e.nbytes)

    @property
    def max_bytes(self) -> int:
        return self._lru.max_bytes

    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        return [self._lru.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        for key, entry in items:
            if not self._lru.put(key, entry):
                logger.debug("cache entry %s (%d bytes) > max_bytes; not kept in memory", key[:12],
                             entry.nbytes)

    def pop(self, key: str) -> None:
        self._lru.pop(key)

    def has_many(self, keys: Sequence[str]) -> list[bool]:
        return [k in self._lru for k in keys]

    def peek_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """:meth:`get_many` without making the entries recently used."""
        return [self._lru.peek(k) for k in keys]

    def has_arrays(self, keys: Sequence[str], prefix: str) -> list[bool]:
        return [e is not None and has_array(e.arrays, prefix) for e in self.peek_many(keys)]

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> StoreStats:
        return StoreStats(entries=len(self._lru), bytes=self._lru.nbytes, evictions=self._lru.evictions)

    def clear(self) -> None:
        self._lru.clear()


class WarnOnce:
    """Log the first message of each category at WARNING, the rest at DEBUG (per instance)."""

    def __init__(self, log: logging.Logger = logger) -> None:
        self._log = log
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, category: str, msg: str, *args: Any) -> None:
        with self._lock:
            first = category not in self._seen
            self._seen.add(category)
        self._log.log(logging.WARNING if first else logging.DEBUG, msg, *args)


class LayeredCache:
    """The engine's fingerprint cache: a :class:`MemoryStore` in front of an optional backend.

    ``get_many`` asks memory, then the backend once for what memory lacks, promotes backend hits
    into memory and applies the caller's ``valid(index, entry)`` check; a rejected entry is dropped
    from memory and counted as invalid. Backend faults (any exception) are logged once, counted in
    ``store_errors`` and answered as misses; ``put_many`` never raises for them either. With
    ``write_behind=True`` the backend's writes run on a worker thread (:mod:`semtoken_rag.writebehind`):
    ``put_many`` returns once memory has the entries, what is queued answers reads until it is written,
    and :meth:`flush` (``close`` too) waits for the writes.

    >>> import numpy as np
    >>> cache = LayeredCache(MemoryStore(1 << 20))
    >>> cache.put("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, 0.5))
    >>> [e is not None for e in cache.get_many(["abcd1234", "dcba4321"])]
    [True, False]
    >>> s = cache.stats()
    >>> s.hits, s.misses, s.encoder_seconds_saved
    (1, 1, 0.5)
    """

    def __init__(self, memory: MemoryStore | None = None, backend: FingerprintStore | None = None, *,
                 write_behind: bool = False) -> None:
        if backend is not None and not isinstance(backend, FingerprintStore):
            raise TypeError(f"backend must be a FingerprintStore, got {type(backend).__name__}")
        self.memory = memory if memory is not None else MemoryStore()
        self.backend = backend
        # the backend's writes on a worker thread (writebehind.py), off the calls that make the entries
        self._behind = WriteBehind(self._write_backend) if backend is not None and write_behind else None
        self._lock = threading.Lock()
        self._hits = self._misses = self._backend_hits = self._invalid = self._errors = 0
        self._saved = 0.0
        self._warn = WarnOnce()

    @property
    def max_bytes(self) -> int:
        return self.memory.max_bytes

    @property
    def cache_dir(self) -> Path | None:
        """The backend's directory when it has one (a ``DirectoryStore``), else ``None``."""
        path = getattr(self.backend, "path", None)
        return path if isinstance(path, Path) else None

    def _backend_call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a store fault must never fail a call
            with self._lock:
                self._errors += 1
            self._warn("store", "fingerprint store %r failed on %s (%s: %s); treating it as a miss",
                       self.backend, what, type(e).__name__, e)
            return None

    def get_many(self, keys: Sequence[str], valid: Callable[[int, CacheEntry], bool] | None = None
                 ) -> list[CacheEntry | None]:
        """One entry or ``None`` per key (memory, then one backend call); see the class docstring."""
        keys = [check_key(k) for k in keys]
        out = self.memory.get_many(keys)
        missing = [i for i, e in enumerate(out) if e is None]
        if missing and self._behind is not None:  # written soon: still this process's own entries
            for i, entry in zip(missing, self._behind.pending([keys[i] for i in missing])):
                out[i] = entry
            missing = [i for i in missing if out[i] is None]
        from_backend: set[int] = set()
        if missing and self.backend is not None:
            got = self._backend_call("get", lambda: self.backend.get_many([keys[i] for i in missing]))
            if got is not None and len(got) != len(missing):
                self._backend_call("get", lambda: _raise(f"{len(got)} answers for {len(missing)} keys"))
                got = None
            for i, entry in zip(missing, got or ()):
                if isinstance(entry, CacheEntry):
                    out[i] = entry
                    from_backend.add(i)
        invalid = 0
        for i, entry in enumerate(out):
            if entry is not None and valid is not None and not _safe_check(valid, i, entry):
                invalid += 1
                out[i] = None
                from_backend.discard(i)
                self.memory.pop(keys[i])
                self._warn("invalid", "ignoring fingerprint cache entry %s: it does not fit its chunk "
                                      "(bad units, shape or values); it will be rebuilt", keys[i][:16])
        promote = [(keys[i], out[i]) for i in sorted(from_backend)]  # type: ignore[misc]
        if promote:
            self.memory.put_many(promote)
        with self._lock:
            self._invalid += invalid
            for entry in out:
                if entry is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._saved += entry.encode_seconds
            self._backend_hits += len(from_backend)
        return out

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        """Store in memory (if it fits) and in the backend (faults logged once, never raised)."""
        items = list(items)
        for key, entry in items:
            check_key(key)
            if not isinstance(entry, CacheEntry):
                raise TypeError(f"entry must be a CacheEntry, got {type(entry).__name__}")
        self.memory.put_many(items)
        if self.backend is not None and items:
            if self._behind is not None:
                self._behind.put_many(items)
            else:
                self._write_backend(items)

    def _write_backend(self, items: list[tuple[str, CacheEntry]]) -> None:
        self._backend_call("put", lambda: self.backend.put_many(items))  # type: ignore[union-attr]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the backend has every entry put before this call (with write-behind; at once
        without; what other threads put meanwhile is not waited for); ``False`` if ``timeout`` ran out."""
        return True if self._behind is None else self._behind.flush(timeout)

    def get(self, key: str) -> CacheEntry | None:
        """``get_many([key])[0]``."""
        return self.get_many([key])[0]

    def put(self, key: str, entry: CacheEntry) -> None:
        """``put_many([(key, entry)])``."""
        self.put_many([(key, entry)])

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored: in the backend when there is one (the shared store is what
        pre-warming fills; memory may hold what the store lost), else in memory. One backend call,
        no stats, no promotion; a backend fault answers ``False``."""
        keys = [check_key(k) for k in keys]
        if self.backend is None:
            return self.memory.has_many(keys)
        queued = self._behind.pending(keys) if self._behind is not None else [None] * len(keys)
        got = self._backend_call("exists", lambda: self.backend.has_many(keys))
        if got is None or len(got) != len(keys):
            got = [False] * len(keys)
        return [bool(hit) or entry is not None for hit, entry in zip(got, queued)]

    def stored_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """What the backend holds for each key (or what is queued for it), else memory when there is no
        backend: the entries as stored, whatever memory holds (pre-warming checks the store's own); no
        stats, no promotion; a fault answers ``None``."""
        keys = [check_key(k) for k in keys]
        if self.backend is None:
            return self.memory.peek_many(keys)
        out = self._behind.pending(keys) if self._behind is not None else [None] * len(keys)
        missing = [i for i, e in enumerate(out) if e is None]
        if missing:
            got = self._backend_call("get", lambda: self.backend.get_many([keys[i] for i in missing]))
            if got is not None and len(got) == len(missing):
                for i, entry in zip(missing, got):
                    out[i] = entry if isinstance(entry, CacheEntry) else None
        return out

    def contains_arrays(self, keys: Sequence[str], prefix: str) -> list[bool]:
        """Which keys hold an entry with an array named ``prefix...`` (:meth:`FingerprintStore.has_arrays`):
        in the backend when there is one (or queued for it), else in memory. ``False`` may also mean
        "not sure" (a backend reads an entry's first bytes only; a fault); no stats, no promotion."""
        keys = [check_key(k) for k in keys]
        if self.backend is None:
            return self.memory.has_arrays(keys, prefix)
        queued = self._behind.pending(keys) if self._behind is not None else [None] * len(keys)
        got = self._backend_call("exists", lambda: self.backend.has_arrays(keys, prefix))
        if got is None or len(got) != len(keys):
            got = [False] * len(keys)
        return [bool(hit) or (entry is not None and has_array(entry.arrays, prefix)) for hit, entry in zip(got, queued)]

    def __contains__(self, key: object) -> bool:
        """True if ``key`` is in memory or the backend has it (no stats, no promotion)."""
        if not is_key(key):
            return False
        if key in self.memory:
            return True
        if self.backend is None:
            return False
        if self._behind is not None and self._behind.pending([key])[0] is not None:
            return True
        got = self._backend_call("get", lambda: self.backend.get_many([key]))
        return bool(got) and got[0] is not None

    def __len__(self) -> int:
        """Number of entries held in memory."""
        return len(self.memory)

    def clear(self, *, disk: bool = True) -> None:
        """Drop every entry from memory and, with ``disk=True``, from the backend (counters stay)."""
        if disk and self._behind is not None:  # (what is queued would land after the clear; dropped before
            self._behind.discard()  # memory is cleared, so that an entry put meanwhile is both kept and written)
        self.memory.clear()
        if disk and self.backend is not None:
            self._backend_call("clear", self.backend.clear)

    def close(self) -> None:
        """Write what is queued, then close the backend's connections (a later call reconnects)."""
        if self.backend is not None:
            self.flush()
            self._backend_call("close", self.backend.close)

    def stats(self) -> CacheStats:
        """A snapshot of the counters (conversation and query fields are the engine's to fill)."""
        mem = self.memory.stats()
        back = StoreStats()
        if self.backend is not None:
            back = self._backend_call("stats", self.backend.stats) or StoreStats()
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, disk_hits=self._backend_hits,
                              evictions=mem.evictions, entries=mem.entries, memory_bytes=mem.bytes,
                              disk_writes=back.writes, corrupt_entries=back.corrupt,
                              invalid_entries=self._invalid, store_errors=self._errors + back.errors,
                              encoder_seconds_saved=self._saved, disk_pruned=back.evictions)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"LayeredCache(entries={s.entries}, memory_bytes={s.memory_bytes}, "
                f"max_bytes={self.max_bytes}, backend={self.backend!r})")


def _raise(message: str) -> None:
    raise RuntimeError(message)


def _safe_check(valid: Callable[[int, CacheEntry], bool], i: int, entry: CacheEntry) -> bool:
    try:
        return bool(valid(i, entry))
    except Exception:  # a check that cannot judge an entry rejects it
        logger.debug("validity check raised for entry %d", i, exc_info=True)
        return False
