"""DirectoryStore: fingerprint entries as files in a directory shared by threads and processes.

Storage layer: one checksummed file per entry (see :mod:`semtoken_rag.fileformat`), bounded in bytes,
recreated when deleted, read even when read-only; a non-regular file or a corrupt one is a miss.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import fileformat as ff
from .fileformat import CacheEntry, CorruptEntry, decode_entry, encode_entry, header_size, starts_entry
from .forksafe import renew_after_fork
from .keys import check_key
from .store import FingerprintStore, StoreStats, WarnOnce

logger = logging.getLogger(__name__)

_SUFFIX = ".stfp"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
# a process's estimate of the directory counts only its own writes: other processes sharing it (replicas,
# workers) write unseen. So the directory is also scanned, and pruned when over the bound, after this share
# of max_disk_bytes of this process's own writes since its last scan: N processes together stay within
# about (1 + N x 0.1) x max_disk_bytes (they reached N x max_disk_bytes), and one alone scans as before
# once the directory is full (it prunes to 90%: the next 10% of writes fill it again)
_RESCAN_SHARE = 0.1
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class DirectoryStore(FingerprintStore):
    """One file per entry, ``cache_dir/<key[:2]>/<key>.stfp``, shared safely by threads and processes.

    Writes are atomic (unique temp file, fsync unless ``fsync=False``, ``os.replace``). Reads open only
    regular files, without blocking (a FIFO at an entry path is a miss, not a hang). A corrupt file is
    counted, logged once and deleted. A deleted directory is recreated by the next write; a read-only
    one is still read (writes fail, logged once). ``max_disk_bytes`` bounds the directory approximately:
    past it the oldest files (by mtime; a hit refreshes it) are deleted down to 90% of the bound, by the
    writing call or, with ``prune_in_background=True`` (the engine's choice), by a thread of its own
    (:meth:`wait_for_prune` waits for it).

    >>> import tempfile
    >>> import numpy as np
    >>> store = DirectoryStore(tempfile.mkdtemp(), max_disk_bytes=1 << 20)
    >>> store.put("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, 0.5))
    >>> store.get("abcd1234").encode_seconds, store.stats().writes
    (0.5, 1)
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, max_disk_bytes: int | None = 2**30,
                 fsync: bool = True, prune_in_background: bool = False) -> None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a str or a path, got {type(cache_dir).__name__}")
        if max_disk_bytes is not None and (isinstance(max_disk_bytes, bool) or not isinstance(max_disk_bytes, int)
                                           or max_disk_bytes < 0):
            raise ValueError(f"max_disk_bytes must be an int >= 0 or None, got {max_disk_bytes!r}")
        self.path = Path(cache_dir).expanduser()
        self.max_disk_bytes, self._fsync = max_disk_bytes, bool(fsync)
        self._background = bool(prune_in_background)
        self._pruner: threading.Thread | None = None  # the background prune running, if any
        renew_after_fork(self)
        self._lock, self._prune_lock = threading.Lock(), threading.Lock()
        self._writes = self._corrupt = self._errors = self._pruned = 0
        self._estimate: int | None = None
        self._since_scan = 0  # bytes this process wrote since its last scan
        self._swept = False  # whether this store's first write has happened (and its stale temp files gone)
        self._warn = WarnOnce(logger)
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
        """Which entry files hold an entry of this format for their key: only the header is read (an older
        version's file or garbage is not stored, so a pre-warm rewrites it; a body damaged after its
        header is found, counted and rewritten when it is read)."""
        keys = [check_key(k) for k in keys]
        return [starts_entry(self._head(k, header_size(k)), k) for k in keys]

    def has_arrays(self, keys: Sequence[str], prefix: str) -> list[bool]:
        """Which entry files hold an entry of this format with an array named ``prefix...`` among the
        arrays their first bytes name (:func:`~semtoken_rag.fileformat.array_names`)."""
        keys = [check_key(k) for k in keys]
        return [ff.has_array(ff.array_names(self._head(k, header_size(k) + ff.NAMES_PEEK), k), prefix) for k in keys]

    def _head(self, key: str, size: int) -> bytes:
        """The first ``size`` bytes of ``key``'s file (fewer if it is shorter; none if it is missing)."""
        path = self._file(key)
        try:
            if not path.is_file():  # (missing, a directory; a FIFO would block open())
                return b""
            with open(path, "rb") as f:
                return f.read(size)
        except OSError:  # (unreadable, or gone meanwhile: not stored)
            return b""

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        for key, entry in items:
            self._write(check_key(key), entry)
        with self._lock:
            estimate, since = self._estimate, self._since_scan
            sweep, self._swept = not self._swept, True
        bound = self.max_disk_bytes
        if bound is not None and (estimate is None or estimate > bound or since > _RESCAN_SHARE * bound):
            if self._background:
                self._prune_soon()
            else:
                self.prune()
        elif bound is None and sweep:  # (unbounded: no prune scans; the temp files a killed writer left, once)
            if self._background:
                self._prune_soon(self._scan)
            else:
                self._scan()

    def _prune_soon(self, work: Callable[[], object] | None = None) -> None:
        """:meth:`prune` (or ``work``, another scan) on a thread of its own, unless one is running: its scan
        (87 ms over the 12,000 files of a full 1 GiB directory) is not paid by the call that wrote."""
        with self._lock:
            if self._pruner is not None and self._pruner.is_alive():
                return
            pruner = threading.Thread(target=work or self.prune, name="semtoken-rag-prune", daemon=True)
            try:
                pruner.start()
            except RuntimeError:  # ("can't start new thread"; at interpreter exit on Python 3.12)
                pruner = None
            self._pruner = pruner
        if pruner is None:
            (work or self.prune)()

    def wait_for_prune(self, timeout: float | None = None) -> bool:
        """Wait for a background prune to end; ``False`` if it still runs after ``timeout`` seconds."""
        with self._lock:
            pruner = self._pruner
        if pruner is not None:
            pruner.join(timeout)
            return not pruner.is_alive()
        return True

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
            self._count_error("io", "cannot write cache file %s (%s); the fingerprints are not persisted (the "
                                    "memory cache keeps them while it has room)", path, e)
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
            self._since_scan += len(data)
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
            with self._lock:
                since_before = self._since_scan
            files = sorted(self._scan())
            total = sum(size for _, size, _ in files)
            removed = gone = pruned = 0  # gone: files another process (a replica pruning too) deleted first
            if total > self.max_disk_bytes:
                goal = int(self.max_disk_bytes * 0.9)
                for _, size, path in files:
                    if total - removed - gone <= goal:
                        break
                    try:
                        os.unlink(path)
                        removed += size
                        pruned += 1
                    except FileNotFoundError:  # (counted as freed, else replicas together empty the store)
                        gone += size
                    except OSError:
                        pass
                logger.debug("pruned %d bytes from %s", removed, self.path)
            with self._lock:  # (what was written during the scan, which may have missed it, counts on)
                during = self._since_scan - since_before
                self._estimate = total - removed - gone + during
                self._since_scan = during
                self._pruned += pruned
            return removed
        finally:
            self._prune_lock.release()

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(writes=self._writes, corrupt=self._corrupt, errors=self._errors, evictions=self._pruned)

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

    def _after_fork(self) -> None:
        """In a forked child: locks held by the parent's threads (a background prune holds one for its whole
        scan) are the parent's, and so is its prune thread."""
        self._lock, self._prune_lock = threading.Lock(), threading.Lock()
        self._pruner = None

