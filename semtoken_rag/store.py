"""Fingerprint stores: a small interface, two backends, and the layered cache the engine uses.

* :class:`FingerprintStore`: the interface. One ``get_many`` per call (a Redis backend pipelines it),
  ``put_many``, ``stats``, ``clear``, ``close``.
* :class:`MemoryStore`: an in-process LRU bounded in bytes.
* :class:`DirectoryStore`: one checksummed file per entry under a directory shared by processes,
  bounded in bytes (oldest files pruned), recreated when deleted, read even when read-only.
* :class:`LayeredCache`: a :class:`MemoryStore` in front of an optional backend. A backend that
  raises is logged once, counted in ``store_errors`` and treated as a miss: a store fault never fails a
  call. An entry the caller's check rejects is counted, logged once and treated as a miss.

Storage layer: imports only numpy, the standard library and its siblings.
"""

from __future__ import annotations

import abc
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileformat import CacheEntry, CorruptEntry, decode_entry, encode_entry
from .keys import check_key, is_key
from .lru import ByteLRU

logger = logging.getLogger(__name__)

_SUFFIX = ".stfp"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class StoreStats:
    """Counters of one :class:`FingerprintStore` backend."""

    entries: int = 0  #: entries held (in memory; 0 where unknown without a scan)
    bytes: int = 0  #: bytes held in memory
    evictions: int = 0  #: entries dropped to honour a byte bound
    writes: int = 0  #: entries written to persistent storage
    corrupt: int = 0  #: stored values that failed to decode (or were not regular files)
    errors: int = 0  #: I/O failures (reads other than "not found", writes)


@dataclass(frozen=True)
class CacheStats:
    """What the engine's caches hold and what they saved (see ``SemToken.cache_stats()``).

    ``hits`` counts memory and backend hits; ``disk_hits`` the part served by the backend (a directory
    or another store). ``corrupt_entries`` failed to decode, ``invalid_entries`` decoded but did not
    fit their chunk; both were misses. ``store_errors`` counts backend faults, each a miss too.
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

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> StoreStats:
        return StoreStats(entries=len(self._lru), bytes=self._lru.nbytes, evictions=self._lru.evictions)

    def clear(self) -> None:
        self._lru.clear()


class _WarnOnce:
    """Log the first message of each category at WARNING, the rest at DEBUG."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, category: str, msg: str, *args: Any) -> None:
        with self._lock:
            first = category not in self._seen
            self._seen.add(category)
        logger.log(logging.WARNING if first else logging.DEBUG, msg, *args)


class DirectoryStore(FingerprintStore):
    """One file per entry, ``cache_dir/<key[:2]>/<key>.stfp``, shared safely by threads and processes.

    Writes are atomic (unique temp file, fsync unless ``fsync=False``, ``os.replace``). Reads open only
    regular files, without blocking (a FIFO at an entry path is a miss, not a hang). A corrupt file is
    counted, logged once and deleted. A deleted directory is recreated by the next write; a read-only
    one is still read (writes fail, logged once). ``max_disk_bytes`` bounds the directory approximately:
    past it the oldest files (by mtime; a hit refreshes it) are deleted down to 90% of the bound.

    >>> import tempfile
    >>> import numpy as np
    >>> store = DirectoryStore(tempfile.mkdtemp(), max_disk_bytes=1 << 20)
    >>> store.put("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, 0.5))
    >>> store.get("abcd1234").encode_seconds, store.stats().writes
    (0.5, 1)
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, max_disk_bytes: int | None = 2**30,
                 fsync: bool = True) -> None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a str or a path, got {type(cache_dir).__name__}")
        if max_disk_bytes is not None and (isinstance(max_disk_bytes, bool) or not isinstance(max_disk_bytes, int)
                                           or max_disk_bytes < 0):
            raise ValueError(f"max_disk_bytes must be an int >= 0 or None, got {max_disk_bytes!r}")
        self.path = Path(cache_dir).expanduser()
        self.max_disk_bytes, self._fsync = max_disk_bytes, bool(fsync)
        self._lock, self._prune_lock = threading.Lock(), threading.Lock()
        self._writes = self._corrupt = self._errors = 0
        self._estimate: int | None = None
        self._warn = _WarnOnce()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._count_error("io", "cache directory %s cannot be created (%s); retrying on each write",
                              self.path, e)
        logger.debug("fingerprint cache directory: %s", self.path)

    def _count_error(self, category: str, msg: str, *args: Any) -> None:
        with self._lock:
            self._errors += 1
        self._warn(category, msg, *args)

    def _file(self, key: str) -> Path:
        return self.path / key[:2] / (key + _SUFFIX)

    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        return [self._read(check_key(k)) for k in keys]

    def _read(self, key: str) -> CacheEntry | None:
        path = self._file(key)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            self._count_error("read", "cannot read fingerprint cache file %s: %s", path, e)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                with self._lock:
                    self._corrupt += 1
                self._warn("corrupt", "ignoring fingerprint cache path %s: not a regular file", path)
                return None
            chunks, left = [], st.st_size
            while left > 0:
                part = os.read(fd, min(left, 1 << 24))
                if not part:
                    break
                chunks.append(part)
                left -= len(part)
            data = b"".join(chunks)
        except OSError as e:
            self._count_error("read", "cannot read fingerprint cache file %s: %s", path, e)
            return None
        finally:
            os.close(fd)
        try:
            entry = decode_entry(data, key)
        except CorruptEntry as e:
            with self._lock:
                self._corrupt += 1
            self._warn("corrupt", "ignoring bad fingerprint cache file %s (%s); it will be rebuilt", path, e)
            try:  # delete it unless another writer replaced it meanwhile
                now = os.stat(path)
                if (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size):
                    os.unlink(path)
            except OSError:
                pass
            return None
        if self.max_disk_bytes is not None:
            try:
                os.utime(path)  # recently used files survive pruning
            except OSError:
                pass
        return entry

    def has_many(self, keys: Sequence[str]) -> list[bool]:
        """Which entry files exist (not read: a corrupt one is found when it is read)."""
        return [self._file(check_key(k)).is_file() for k in keys]

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        for key, entry in items:
            self._write(check_key(key), entry)
        with self._lock:
            estimate = self._estimate
        if self.max_disk_bytes is not None and (estimate is None or estimate > self.max_disk_bytes):
            self.prune()

    def _write(self, key: str, entry: CacheEntry) -> None:
        path, data, tmp = self._file(key), encode_entry(key, entry), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # recreates a deleted cache_dir
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            self._count_error("io", "cannot write cache file %s (%s); keeping it in memory only", path, e)
            return
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        logger.debug("cache write %s (%d bytes)", path, len(data))
        with self._lock:
            self._writes += 1
            if self._estimate is not None:
                self._estimate += len(data)

    def _scan(self) -> list[tuple[int, int, Path]]:
        """(mtime_ns, size, path) of every entry file; removes stale temp files on the way."""
        files: list[tuple[int, int, Path]] = []
        now = time.time()
        try:
            shards = [s for s in os.scandir(self.path) if len(s.name) == 2 and s.is_dir(follow_symlinks=False)]
        except OSError:
            return files
        for shard in shards:
            try:
                listing = list(os.scandir(shard.path))
            except OSError:
                continue
            for f in listing:
                try:
                    st = f.stat(follow_symlinks=False)
                    if f.name.endswith(_SUFFIX):
                        files.append((st.st_mtime_ns, st.st_size, Path(f.path)))
                    elif f.name.startswith(_TMP_PREFIX) and now - st.st_mtime > _STALE_TMP_SECONDS:
                        os.unlink(f.path)
                except OSError:
                    pass
        return files

    def disk_bytes(self) -> int:
        """Bytes of entry files in the directory now (a scan)."""
        return sum(size for _, size, _ in self._scan())

    def prune(self) -> int:
        """Delete the oldest files until the directory is under 90% of ``max_disk_bytes``.

        Returns the number of bytes removed (0 without a bound, or while another thread prunes).
        """
        if self.max_disk_bytes is None or not self._prune_lock.acquire(blocking=False):
            return 0
        try:
            files = sorted(self._scan())
            total = sum(size for _, size, _ in files)
            removed = 0
            if total > self.max_disk_bytes:
                goal = int(self.max_disk_bytes * 0.9)
                for _, size, path in files:
                    if total - removed <= goal:
                        break
                    try:
                        os.unlink(path)
                        removed += size
                    except OSError:
                        pass
                logger.debug("pruned %d bytes from %s", removed, self.path)
            with self._lock:
                self._estimate = total - removed
            return removed
        finally:
            self._prune_lock.release()

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(writes=self._writes, corrupt=self._corrupt, errors=self._errors)

    def clear(self) -> None:
        """Delete every entry file (other files in the directory are left alone)."""
        for _, _, path in self._scan():
            try:
                os.unlink(path)
            except OSError:
                pass
        with self._lock:
            self._estimate = None

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.path)!r}, max_disk_bytes={self.max_disk_bytes})"


class LayeredCache:
    """The engine's fingerprint cache: a :class:`MemoryStore` in front of an optional backend.

    ``get_many`` asks memory, then the backend once for what memory lacks, promotes backend hits
    into memory and applies the caller's ``valid(index, entry)`` check; a rejected entry is dropped
    from memory and counted as invalid. Backend faults (any exception) are logged once, counted in
    ``store_errors`` and answered as misses; ``put_many`` never raises for them either.

    >>> import numpy as np
    >>> cache = LayeredCache(MemoryStore(1 << 20))
    >>> cache.put("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, 0.5))
    >>> [e is not None for e in cache.get_many(["abcd1234", "dcba4321"])]
    [True, False]
    >>> s = cache.stats()
    >>> s.hits, s.misses, s.encoder_seconds_saved
    (1, 1, 0.5)
    """

    def __init__(self, memory: MemoryStore | None = None, backend: FingerprintStore | None = None) -> None:
        if backend is not None and not isinstance(backend, FingerprintStore):
            raise TypeError(f"backend must be a FingerprintStore, got {type(backend).__name__}")
        self.memory = memory if memory is not None else MemoryStore()
        self.backend = backend
        self._lock = threading.Lock()
        self._hits = self._misses = self._backend_hits = self._invalid = self._errors = 0
        self._saved = 0.0
        self._warn = _WarnOnce()

    @property
    def max_bytes(self) -> int:
        return self.memory.max_bytes

    @property
    def cache_dir(self) -> Path | None:
        """The backend's directory when it is a :class:`DirectoryStore`, else ``None``."""
        return self.backend.path if isinstance(self.backend, DirectoryStore) else None

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
            self._backend_call("put", lambda: self.backend.put_many(items))

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
        got = self._backend_call("exists", lambda: self.backend.has_many(keys))
        if got is None or len(got) != len(keys):
            return [False] * len(keys)
        return [bool(hit) for hit in got]

    def __contains__(self, key: object) -> bool:
        """True if ``key`` is in memory or the backend has it (no stats, no promotion)."""
        if not is_key(key):
            return False
        if key in self.memory:
            return True
        if self.backend is None:
            return False
        got = self._backend_call("get", lambda: self.backend.get_many([key]))
        return bool(got) and got[0] is not None

    def __len__(self) -> int:
        """Number of entries held in memory."""
        return len(self.memory)

    def clear(self, *, disk: bool = True) -> None:
        """Drop every entry from memory and, with ``disk=True``, from the backend (counters stay)."""
        self.memory.clear()
        if disk and self.backend is not None:
            self._backend_call("clear", self.backend.clear)

    def close(self) -> None:
        if self.backend is not None:
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
                              encoder_seconds_saved=self._saved)

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
