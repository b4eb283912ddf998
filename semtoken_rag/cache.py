"""Fingerprint cache and FAISS repeat detection.

* :func:`cache_key` hashes a chunk's text with the encoder identity and fingerprint settings.
* :class:`FingerprintCache` maps keys to :class:`CacheEntry` objects (named numpy arrays): an
  in-memory LRU bounded in bytes, optionally persisted to a directory (one checksummed, versioned
  file per entry, written atomically; corrupt or foreign files are logged once and treated as misses).
* :func:`find_repeats` and :class:`ConversationMemory` find spans whose centroids repeat content
  already kept in another chunk of the call, or already sent to the same conversation.

Only numpy and the standard library are imported at module import; faiss is imported lazily.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"SEMTKFP\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<HHdH")  # version, key length, encode_seconds, number of arrays
_DIGEST_SIZE = 16
_SUFFIX = ".stfp"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
_ENTRY_OVERHEAD = 256  # bytes charged per entry for Python objects and bookkeeping
_ARRAY_OVERHEAD = 112  # bytes charged per numpy array object
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{4,128}\Z")
_KINDS = "biuf"  # bool, signed, unsigned, float: never object/str/void dtypes


def cache_key(text: str, namespace: str) -> str:
    """Return a 64-hex-digit BLAKE2b key for ``text`` under ``namespace``.

    ``namespace`` names everything that changes the fingerprints (encoder identity and revision,
    window and pooling settings). Any ``str`` works, including lone surrogates.

    >>> k = cache_key("Paris is in France.", "all-MiniLM-L6-v2|win=256")
    >>> len(k), k == cache_key("Paris is in France.", "other-encoder")
    (64, False)
    """
    if not isinstance(text, str) or not isinstance(namespace, str):
        raise TypeError(f"text and namespace must be str, got {type(text).__name__}, "
                        f"{type(namespace).__name__}")
    ns = namespace.encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(digest_size=32, person=b"semtoken-rag-fp")
    h.update(struct.pack("<Q", len(ns)))  # length prefix: ("ab", "c") and ("a", "bc") differ
    h.update(ns)
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class CacheEntry:
    """Named numpy arrays cached for one chunk, plus the encoder seconds they cost.

    Arrays are copied into read-only, C-ordered, little-endian arrays. An array named
    ``"fingerprints"`` must already be ``float16`` (``TypeError`` otherwise, so that warm and cold
    paths see the same rounded values); only bool/int/uint/float dtypes are allowed.

    >>> e = CacheEntry({"fingerprints": np.zeros((3, 4), np.float16),
    ...                 "offsets": np.zeros((3, 2), np.int32)}, encode_seconds=0.01)
    >>> e["fingerprints"].shape, e["offsets"].flags.writeable
    ((3, 4), False)
    """

    arrays: Mapping[str, np.ndarray]
    encode_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.arrays, Mapping):
            raise TypeError(f"arrays must map names to numpy arrays, got {type(self.arrays).__name__}")
        frozen: dict[str, np.ndarray] = {}
        for name, value in self.arrays.items():
            if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > 255:
                raise ValueError(f"array names must be non-empty str of at most 255 bytes, got {name!r}")
            if not isinstance(value, np.ndarray):
                raise TypeError(f"array {name!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype.kind not in _KINDS or value.ndim > 32:
                raise TypeError(f"array {name!r} has dtype {value.dtype}, ndim {value.ndim}; "
                                "allowed: bool/int/uint/float, ndim <= 32")
            if name == "fingerprints" and value.dtype != np.float16:
                raise TypeError(f"fingerprints must be float16, got {value.dtype}; use .astype(np.float16)")
            arr = np.array(value, dtype=value.dtype.newbyteorder("<"), order="C", copy=True)
            arr.flags.writeable = False
            frozen[name] = arr
        seconds = float(self.encode_seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"encode_seconds must be a finite number >= 0, got {self.encode_seconds!r}")
        object.__setattr__(self, "arrays", MappingProxyType(frozen))
        object.__setattr__(self, "encode_seconds", seconds)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    @property
    def nbytes(self) -> int:
        """Bytes charged against ``max_bytes``: array payloads plus a fixed overhead."""
        return _ENTRY_OVERHEAD + sum(a.nbytes + _ARRAY_OVERHEAD for a in self.arrays.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={a.dtype}{a.shape}" for k, a in self.arrays.items())
        return f"CacheEntry({parts}, encode_seconds={self.encode_seconds:.4g})"


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`FingerprintCache` (``hits`` counts memory and disk hits)."""

    hits: int
    misses: int
    disk_hits: int
    evictions: int
    entries: int
    memory_bytes: int
    encoder_seconds_saved: float
    disk_writes: int
    corrupt_files: int


class _Corrupt(Exception):
    pass


_DECODE_ERRORS = (_Corrupt, struct.error, ValueError, TypeError, UnicodeDecodeError, OverflowError)


def _encode(key: str, entry: CacheEntry) -> bytes:
    kb = key.encode("ascii")
    parts = [MAGIC, _HEADER.pack(FORMAT_VERSION, len(kb), entry.encode_seconds, len(entry.arrays)), kb]
    for name, arr in entry.arrays.items():
        nb, ds = name.encode("utf-8", "surrogatepass"), arr.dtype.str.encode("ascii")
        parts += [struct.pack("<H", len(nb)), nb, struct.pack("<B", len(ds)), ds,
                  struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape)]
    parts += [arr.tobytes() for arr in entry.arrays.values()]
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest()


def _decode(data: bytes, key: str) -> CacheEntry:
    start = len(MAGIC) + _HEADER.size
    if len(data) < start + _DIGEST_SIZE:
        raise _Corrupt(f"truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise _Corrupt("not a fingerprint cache file (bad magic)")
    version, key_len, seconds, n_arrays = _HEADER.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise _Corrupt(f"format version {version}, expected {FORMAT_VERSION}")
    body = memoryview(data)[:-_DIGEST_SIZE]
    if hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest() != data[-_DIGEST_SIZE:]:
        raise _Corrupt("checksum mismatch (truncated or overwritten)")
    stored = bytes(body[start : start + key_len]).decode("ascii")
    if stored != key:
        raise _Corrupt(f"file holds another key ({stored[:16]}...)")
    pos, specs = start + key_len, []
    for _ in range(n_arrays):
        (n,) = struct.unpack_from("<H", body, pos)
        name = bytes(body[pos + 2 : pos + 2 + n]).decode("utf-8", "surrogatepass")
        pos += 2 + n
        (n,) = struct.unpack_from("<B", body, pos)
        dtype = np.dtype(bytes(body[pos + 1 : pos + 1 + n]).decode("ascii"))
        pos += 1 + n
        (ndim,) = struct.unpack_from("<B", body, pos)
        shape = struct.unpack_from(f"<{ndim}Q", body, pos + 1)
        pos += 1 + 8 * ndim
        specs.append((name, dtype, shape))
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in specs:
        count = math.prod(shape)
        if dtype.kind not in _KINDS or pos + count * dtype.itemsize > len(body):
            raise _Corrupt(f"array {name!r}: bad dtype or payload shorter than its shape {shape}")
        flat = np.frombuffer(body, dtype, count, pos) if count else np.empty(0, dtype)
        arrays[name] = flat.reshape(shape)
        pos += count * dtype.itemsize
    if pos != len(body) or len(arrays) != n_arrays:
        raise _Corrupt("header and payload sizes disagree")
    return CacheEntry(arrays, seconds)


class FingerprintCache:
    """Thread-safe key -> :class:`CacheEntry` store: byte-bounded LRU in memory, optional directory.

    ``max_bytes=0`` disables the memory tier. With ``cache_dir`` every ``put`` also writes
    ``cache_dir/<key[:2]>/<key>.stfp`` atomically (unique temp file, fsync unless ``fsync=False``,
    ``os.replace``), and a ``get`` that misses memory reads the file and promotes it. A directory
    that cannot be created or written is logged once; the cache then works in memory only.
    ``max_disk_bytes`` bounds the directory approximately by deleting the oldest files (by mtime).

    >>> cache = FingerprintCache(max_bytes=1 << 20)
    >>> key = cache_key("some chunk", "encoder-id")
    >>> cache.put(key, CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, encode_seconds=0.5))
    >>> cache.get(key)["fingerprints"].dtype, cache.stats().encoder_seconds_saved
    (dtype('float16'), 0.5)
    """

    def __init__(self, max_bytes: int = 256 * 2**20, cache_dir: str | os.PathLike[str] | None = None, *,
                 max_disk_bytes: int | None = None, fsync: bool = True) -> None:
        for label, value in (("max_bytes", max_bytes), ("max_disk_bytes", max_disk_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{label} must be an int >= 0, got {value!r}")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a str, a path or None, got {type(cache_dir).__name__}")
        self._max_bytes, self._max_disk_bytes, self._fsync = max_bytes, max_disk_bytes, bool(fsync)
        self._lock, self._prune_lock = threading.RLock(), threading.Lock()
        self._mem: OrderedDict[str, CacheEntry] = OrderedDict()
        self._mem_bytes = self._hits = self._misses = self._disk_hits = self._evictions = 0
        self._disk_writes = self._corrupt = 0
        self._saved = 0.0
        self._warned: set[str] = set()
        self._disk_estimate: int | None = None
        self._dir = None if cache_dir is None else self._open_dir(Path(cache_dir).expanduser())

    @property
    def cache_dir(self) -> Path | None:
        """The directory in use, or ``None`` when caching in memory only."""
        return self._dir

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def _warn_once(self, category: str, msg: str, *args: Any) -> None:
        with self._lock:
            first = category not in self._warned
            self._warned.add(category)
        logger.log(logging.WARNING if first else logging.DEBUG, msg, *args)

    def _open_dir(self, path: Path) -> Path | None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            self._warn_once("io", "cache directory %s unusable (%s); caching in memory only", path, e)
            return None
        logger.debug("fingerprint cache directory: %s", path)
        return path

    def _path(self, key: str) -> Path:
        assert self._dir is not None
        return self._dir / key[:2] / (key + _SUFFIX)

    def _read(self, key: str) -> CacheEntry | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once("io", "cannot read fingerprint cache file %s: %s", path, e)
            return None
        try:
            return _decode(data, key)
        except _DECODE_ERRORS as e:
            with self._lock:
                self._corrupt += 1
            self._warn_once("corrupt", "ignoring bad fingerprint cache file %s (%s); it will be rebuilt",
                            path, e)
            try:  # delete it unless another writer replaced it meanwhile
                now = os.stat(path)
                if (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size):
                    os.unlink(path)
            except OSError:
                pass
            return None

    def _remember(self, key: str, entry: CacheEntry) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._mem_bytes -= old.nbytes
        size = entry.nbytes
        if size > self._max_bytes:
            logger.debug("cache entry %s (%d bytes) > max_bytes; not kept in memory", key[:12], size)
            return
        self._mem[key] = entry
        self._mem_bytes += size
        while self._mem_bytes > self._max_bytes:
            old_key, old = self._mem.popitem(last=False)
            self._mem_bytes -= old.nbytes
            self._evictions += 1
            logger.debug("cache evict %s (%d bytes)", old_key[:12], old.nbytes)

    def get(self, key: str) -> CacheEntry | None:
        """Return the entry for ``key`` (memory first, then disk) or ``None`` on a miss."""
        _check_key(key)
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                self._hits += 1
                self._saved += entry.encode_seconds
                logger.debug("cache hit (memory) %s", key[:12])
                return entry
        entry = self._read(key) if self._dir is not None else None
        with self._lock:
            if entry is None:
                self._misses += 1
                logger.debug("cache miss %s", key[:12])
                return None
            self._hits += 1
            self._disk_hits += 1
            self._saved += entry.encode_seconds
            self._remember(key, entry)
        logger.debug("cache hit (disk) %s", key[:12])
        if self._max_disk_bytes is not None:
            try:
                os.utime(self._path(key))  # recently used files survive pruning
            except OSError:
                pass
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        """Store ``entry`` under ``key`` in memory (if it fits) and on disk (if a directory is set)."""
        _check_key(key)
        if not isinstance(entry, CacheEntry):
            raise TypeError(f"entry must be a CacheEntry, got {type(entry).__name__}")
        with self._lock:
            self._remember(key, entry)
        if self._dir is not None:
            self._write(key, entry)

    def _write(self, key: str, entry: CacheEntry) -> None:
        path, data, tmp = self._path(key), _encode(key, entry), None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            self._warn_once("io", "cannot write cache file %s (%s); keeping it in memory only", path, e)
            return
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        logger.debug("cache write %s (%d bytes)", path, len(data))
        with self._lock:
            self._disk_writes += 1
            if self._disk_estimate is not None:
                self._disk_estimate += len(data)
            estimate = self._disk_estimate
        if self._max_disk_bytes is not None and (estimate is None or estimate > self._max_disk_bytes):
            self.prune_disk()

    def _scan(self) -> list[tuple[int, int, Path]]:
        """(mtime_ns, size, path) of every entry file; removes stale temp files on the way."""
        files, now = [], time.time()
        if self._dir is None:
            return files
        for shard in os.scandir(self._dir):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for f in os.scandir(shard.path):
                try:
                    st = f.stat()
                    if f.name.endswith(_SUFFIX):
                        files.append((st.st_mtime_ns, st.st_size, Path(f.path)))
                    elif f.name.startswith(_TMP_PREFIX) and now - st.st_mtime > _STALE_TMP_SECONDS:
                        os.unlink(f.path)
                except OSError:
                    pass
        return files

    def prune_disk(self) -> int:
        """Delete the oldest files until the directory is under 90% of ``max_disk_bytes``.

        Returns the number of bytes removed (0 without a directory or a bound).
        """
        if self._dir is None or self._max_disk_bytes is None or not self._prune_lock.acquire(blocking=False):
            return 0
        try:
            files = sorted(self._scan())
            total = sum(size for _, size, _ in files)
            removed = 0
            if total > self._max_disk_bytes:
                goal = int(self._max_disk_bytes * 0.9)
                for _, size, path in files:
                    if total - removed <= goal:
                        break
                    try:
                        os.unlink(path)
                        removed += size
                    except OSError:
                        pass
                logger.debug("pruned %d bytes from %s", removed, self._dir)
            with self._lock:
                self._disk_estimate = total - removed
            return removed
        finally:
            self._prune_lock.release()

    def __contains__(self, key: object) -> bool:
        """True if ``key`` is in memory or has a valid file (no stats, no promotion)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            return False
        with self._lock:
            if key in self._mem:
                return True
        return self._dir is not None and self._read(key) is not None

    def __len__(self) -> int:
        """Number of entries held in memory."""
        with self._lock:
            return len(self._mem)

    def clear(self, *, disk: bool = True) -> None:
        """Drop every entry from memory and, with ``disk=True``, delete the entry files (counters stay)."""
        with self._lock:
            self._mem.clear()
            self._mem_bytes = 0
        if disk and self._dir is not None:
            for _, _, path in self._scan():
                try:
                    os.unlink(path)
                except OSError:
                    pass
            with self._lock:
                self._disk_estimate = None

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, disk_hits=self._disk_hits,
                              evictions=self._evictions, entries=len(self._mem), memory_bytes=self._mem_bytes,
                              encoder_seconds_saved=self._saved, disk_writes=self._disk_writes,
                              corrupt_files=self._corrupt)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"FingerprintCache(entries={s.entries}, memory_bytes={s.memory_bytes}, "
                f"max_bytes={self._max_bytes}, cache_dir={self._dir})")


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"cache keys must be 4-128 chars of [0-9A-Za-z_-] (see cache_key()), got {key!r}")


# ----------------------------------------------------------------------------- FAISS repeats

_GPU = threading.local()  # StandardGpuResources is not thread-safe: one per thread


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("repeat detection needs FAISS: pip install faiss-cpu "
                          "(or 'semtoken-rag[gpu]' for faiss-gpu on CUDA machines)") from e
    return faiss


def _matrix(centroids: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(centroids, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"centroids must be a 2-D array (n, d), got shape {x.shape}")
    return x


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except RuntimeError:
        return False


def _neighbors(x: np.ndarray, threshold: float, use_gpu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j, sim) with inner product ``x[i] . x[j] >= threshold`` (self pairs included)."""
    faiss = _faiss()
    cpu = faiss.IndexFlatIP(x.shape[1])
    cpu.add(x)
    rows = np.arange(len(x))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if use_gpu:
        try:
            if getattr(_GPU, "res", None) is None:
                _GPU.res = faiss.StandardGpuResources()
            k = min(len(x), 256)
            sims, ids = faiss.index_cpu_to_gpu(_GPU.res, 0, cpu).search(x, k)
            ok = (ids >= 0) & (sims >= threshold)
            full = ok[:, -1] if k < len(x) else np.zeros(len(x), bool)  # maybe more than k: redo on CPU
            qi, col = np.nonzero(ok & ~full[:, None])
            parts.append((qi, ids[qi, col], sims[qi, col]))
            rows = np.flatnonzero(full)
        except (RuntimeError, AttributeError) as e:
            logger.debug("FAISS GPU search failed (%s); using CPU", e)
            parts, rows = [], np.arange(len(x))
    if len(rows):
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps sim > radius
        lims, sims, ids = cpu.range_search(x[rows], radius)
        qi = np.repeat(rows, np.diff(lims.astype(np.int64)))
        keep = sims >= threshold
        parts.append((qi[keep], ids[keep], sims[keep]))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def find_repeats(centroids: np.ndarray, groups: np.ndarray, order: np.ndarray, threshold: float,
                 eligible: np.ndarray | None = None, *, use_gpu: bool | None = None) -> np.ndarray:
    """For each span, the index of a higher-priority span it repeats, else -1.

    ``centroids`` (n, d) are L2-normalised span centroids, ``groups`` (n,) the chunk of each span,
    ``order`` (n,) a permutation of ``range(n)``, best first. Span ``i`` repeats span ``j`` when they
    belong to different groups, ``j`` comes earlier in ``order``, ``cos >= threshold`` and ``j`` is
    not a repeat itself; among such ``j`` the most similar wins. Ineligible spans are never marked and
    never used as originals. One FAISS range search, then one greedy pass in priority order.
    ``use_gpu=None`` uses a FAISS GPU index when available (falls back to CPU).

    >>> c = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    >>> find_repeats(c, groups=np.array([0, 0, 1]), order=np.array([0, 1, 2]), threshold=0.95).tolist()
    [-1, -1, 0]
    """
    x = _matrix(centroids)
    n = x.shape[0]
    groups, order = np.asarray(groups), np.asarray(order)
    ok_mask = np.ones(n, bool) if eligible is None else np.asarray(eligible, dtype=bool)
    for label, arr in (("groups", groups), ("order", order), ("eligible", ok_mask)):
        if arr.shape != (n,):
            raise ValueError(f"{label} must have shape ({n},), got {arr.shape}")
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of range(n)")
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite float, got {threshold!r}")
    result = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(ok_mask)
    if idx.size < 2 or n == 0 or x.shape[1] == 0:
        return result
    gpu = faiss_gpu_available() if use_gpu is None else bool(use_gpu)
    qi, nj, sims = _neighbors(x[idx], float(threshold), gpu)
    q, j = idx[qi], idx[nj]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    keep = (groups[q] != groups[j]) & (rank[j] < rank[q])
    q, j, sims = q[keep], j[keep], sims[keep]
    sort = np.lexsort((rank[j], -sims, rank[q]))  # by query priority, then similarity, then original priority
    out = result.tolist()
    for a, b in zip(q[sort].tolist(), j[sort].tolist()):
        if out[a] == -1 and out[b] == -1:  # b's status is final: all its own pairs came earlier
            out[a] = b
    return np.asarray(out, dtype=np.int64)


class ConversationMemory:
    """Span centroids already sent to each conversation, for recognising repeats across turns.

    Holds at most ``max_conversations`` conversations (least recently used dropped first) and the
    newest ``max_spans`` centroids per conversation. Thread-safe; CPU FAISS ``IndexFlatIP``.

    >>> mem = ConversationMemory()
    >>> mem.add("chat-1", np.array([[1, 0]], np.float32))
    >>> mem.query("chat-1", np.array([[1, 0], [0, 1]], np.float32), threshold=0.9).tolist()
    [True, False]
    >>> mem.query("chat-2", np.array([[1, 0]], np.float32), threshold=0.9).tolist()
    [False]
    """

    def __init__(self, max_conversations: int = 1024, max_spans: int = 4096) -> None:
        for label, value in (("max_conversations", max_conversations), ("max_spans", max_spans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        self.max_conversations, self.max_spans = max_conversations, max_spans
        self._lock = threading.RLock()
        self._convs: OrderedDict[str, tuple[np.ndarray, Any]] = OrderedDict()

    def add(self, conversation_id: str, centroids: np.ndarray) -> None:
        """Record that ``conversation_id`` received spans with these centroids."""
        x = _matrix(centroids)
        with self._lock:
            old = self._convs.pop(conversation_id, None)
            if old is not None and old[0].shape[1] != x.shape[1]:
                self._convs[conversation_id] = old
                raise ValueError(f"dimension {x.shape[1]} != {old[0].shape[1]} for {conversation_id!r}")
            vectors = x if old is None else np.concatenate([old[0], x])
            if old is not None and len(vectors) <= self.max_spans:
                index = old[1]
                index.add(x)
            else:
                vectors = vectors[-self.max_spans :]
                index = _faiss().IndexFlatIP(x.shape[1])
                index.add(vectors)
            self._convs[conversation_id] = (vectors, index)
            while len(self._convs) > self.max_conversations:
                dropped, _ = self._convs.popitem(last=False)
                logger.debug("conversation memory: dropped %r", dropped)

    def query(self, conversation_id: str, centroids: np.ndarray, threshold: float) -> np.ndarray:
        """Bool mask: which centroids have a stored neighbour with cosine >= ``threshold``."""
        x = _matrix(centroids)
        with self._lock:
            conv = self._convs.get(conversation_id)
            if conv is None or len(x) == 0:
                return np.zeros(len(x), dtype=bool)
            self._convs.move_to_end(conversation_id)
            if conv[0].shape[1] != x.shape[1]:
                raise ValueError(f"dimension {x.shape[1]} != {conv[0].shape[1]} for {conversation_id!r}")
            sims, _ = conv[1].search(x, 1)
        return sims[:, 0] >= threshold

    def spans(self, conversation_id: str) -> int:
        """Number of centroids stored for ``conversation_id`` (0 if unknown)."""
        with self._lock:
            conv = self._convs.get(conversation_id)
            return 0 if conv is None else len(conv[0])

    def forget(self, conversation_id: str) -> None:
        with self._lock:
            self._convs.pop(conversation_id, None)

    def clear(self) -> None:
        with self._lock:
            self._convs.clear()

    def __contains__(self, conversation_id: object) -> bool:
        with self._lock:
            return conversation_id in self._convs

    def __len__(self) -> int:
        with self._lock:
            return len(self._convs)
