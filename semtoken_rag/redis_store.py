"""RedisStore: fingerprints shared by many replicas through Redis (storage layer; ``redis`` extra).

Values are the binary entry format of :mod:`semtoken_rag.fileformat` (versioned, checksummed, the
key inside; no pickle). Redis keys are ``semtoken-rag:fp<version>:<encoder tag>:<cache key>``: the
encoder's identity is in the namespace, so replicas with different encoders never share, and
:meth:`RedisStore.clear` deletes only this encoder's entries. One pipelined ``MGET`` answers a whole
call; writes are one pipeline of ``SET`` (with ``PX`` when a TTL is set).

A store fault never fails a call. Connection errors and timeouts (short: ``timeout_seconds``) are
counted in ``errors``, logged once, and open a back-off window (doubling from ``backoff_seconds`` to
``max_backoff_seconds``) during which the store answers misses and drops writes without touching the
network; the first call after it reconnects. A value that fails to decode (garbage, another version,
another key) is counted in ``corrupt`` and is a miss; the engine then encodes and overwrites it.
Entries evicted by Redis (``maxmemory``) are misses; a refused write (``OOM``) is an error.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .fileformat import (
    FORMAT_VERSION,
    NAMES_PEEK,
    CacheEntry,
    CorruptEntry,
    array_names,
    decode_entry,
    encode_entry,
    has_array,
    header_size,
    starts_entry,
)
from .keys import check_key
from .store import FingerprintStore, StoreStats

logger = logging.getLogger(__name__)

_PIPELINE_BYTES = 4 * 2**20  # flush a write pipeline past this many value bytes
_SCAN_COUNT = 1000
_SETUP_REFUSALS = frozenset({"NOAUTH", "WRONGPASS", "NOPERM"})  # replies that come before any command runs


def _redis() -> Any:
    try:
        import redis
    except ImportError as e:
        raise ImportError("a Redis fingerprint store needs the redis client: "
                          "pip install 'semtoken-rag[redis]'") from e
    return redis


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and reprs).

    >>> safe_url("redis://user:secret@cache:6379/0")
    'redis://user:***@cache:6379/0'
    """
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def check_database(url: str) -> None:
    """Refuse a database that is not a plain number (redis-py reads ``/abc`` as database 0 and ``/1/2``
    as 12, so a typo silently shares another database). Spaces around it, a trailing slash and an empty
    ``?db=`` (database 0) mean what redis-py reads.

    >>> check_database("redis://cache:6379/3"), check_database("unix:///run/redis.sock?db=2")
    (None, None)
    >>> check_database("redis://cache:6379/0/"), check_database("redis://cache:6379?db=")
    (None, None)
    >>> check_database("redis://cache:6379/cache")
    Traceback (most recent call last):
    ValueError: redis://cache:6379/cache: the database must be a number (redis://host:port/0), got 'cache'
    """
    parsed = urlsplit(url)
    dbs = [v for k, v in parse_qsl(parsed.query, keep_blank_values=True) if k == "db"]
    if parsed.scheme != "unix" and parsed.path not in ("", "/"):
        dbs.append(unquote(parsed.path[1:]).removesuffix("/"))
    for db in dbs:
        if db.strip() and not (db.strip().isascii() and db.strip().isdigit()):
            raise ValueError(f"{safe_url(url)}: the database must be a number (redis://host:port/0), got {db!r}")


def encoder_tag(namespace: str) -> str:
    """A short, stable tag of the encoder identity for Redis key names.

    >>> encoder_tag("all-MiniLM-L6-v2|win=256") == encoder_tag("all-MiniLM-L6-v2|win=256")
    True
    >>> len(encoder_tag("x")), encoder_tag("x") != encoder_tag("y")
    (16, True)
    """
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, got {type(namespace).__name__}")
    return hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class RedisStore(FingerprintStore):
    """A :class:`~semtoken_rag.store.FingerprintStore` on a Redis server, shared by processes and hosts.

    Args:
        url: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS) or
            ``unix:///path/redis.sock?db=0``.
        namespace: the encoder's identity (``SemToken(...).encoder.identity``).
        ttl_seconds: expire entries this long after they are written (``None``: never; Redis may
            still evict them under ``maxmemory``).
        timeout_seconds: connect and read timeout of every command, short on purpose: a slow store
            costs at most this much before the call encodes locally.
        backoff_seconds, max_backoff_seconds: the back-off window after a connection fault.
        client: an existing ``redis.Redis`` (tests, custom pools); ``url`` is then only a label.

    Example (needs a server; ``tests/test_redis_store.py`` runs these against a real one)::

        store = RedisStore("redis://127.0.0.1:6379/0", namespace=engine.encoder.identity, ttl_seconds=86400)
        store.put_many([(key, entry)])
        store.get_many([key, other_key])   # [entry, None]: one MGET
    """

    def __init__(self, url: str, *, namespace: str, ttl_seconds: float | None = None,
                 timeout_seconds: float = 0.1, backoff_seconds: float = 0.5, max_backoff_seconds: float = 30.0,
                 client: Any = None) -> None:
        if isinstance(url, str) and "://" in url:  # (a scheme is case-insensitive, as the config takes it)
            scheme, rest = url.split("://", 1)
            url = f"{scheme.lower()}://{rest}"
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {url!r}")
        for label, value in (("timeout_seconds", timeout_seconds), ("backoff_seconds", backoff_seconds),
                             ("max_backoff_seconds", max_backoff_seconds)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{label} must be a number > 0, got {value!r}")
        if ttl_seconds is not None and (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float))
                                        or not ttl_seconds >= 0.001):
            raise ValueError(f"ttl_seconds must be a number >= 0.001 or None, got {ttl_seconds!r}")
        if client is None:  # (with a client the URL is a label)
            check_database(url)
        redis = _redis()
        self.url = safe_url(url)
        self.prefix = f"semtoken-rag:fp{FORMAT_VERSION}:{encoder_tag(namespace)}:"
        self.ttl_ms = None if ttl_seconds is None else max(1, round(ttl_seconds * 1000))
        self.timeout_seconds = float(timeout_seconds)
        self._backoff = (float(backoff_seconds), float(max_backoff_seconds))
        # faults open the back-off window: the store cannot be reached, or what answers is not a Redis that
        # takes our commands (InvalidResponse: another service at the URL)
        self._faults = (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.InvalidResponse)
        self._response_error = redis.ResponseError
        self.client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), retry_on_timeout=False,
            health_check_interval=0, client_name="semtoken-rag")
        self._lock = threading.Lock()
        self._writes = self._corrupt = self._errors = self._skipped = 0
        self._down_until = 0.0
        self._delay = 0.0
        self._warned: set[str] = set()

    # -- faults ------------------------------------------------------------------------------------
    def _warn_once(self, category: str, msg: str, *args: Any) -> None:
        with self._lock:
            first = category not in self._warned
            self._warned.add(category)
        logger.log(logging.WARNING if first else logging.DEBUG, msg, *args)

    def _available(self) -> bool:
        """False inside a back-off window (the call is answered locally, nothing sent)."""
        with self._lock:
            if time.monotonic() < self._down_until:
                self._skipped += 1
                return False
            return True

    def _fault(self, what: str, error: BaseException) -> None:
        with self._lock:
            self._errors += 1
            # a fault while a window is open comes from a call that was in flight when it opened (calls in
            # the window send nothing): the same outage, so the window neither doubles nor moves
            if time.monotonic() >= self._down_until:
                self._delay = min(self._backoff[1], self._delay * 2 if self._delay else self._backoff[0])
                self._down_until = time.monotonic() + self._delay
            delay = self._delay
        self._warn_once("down", "Redis fingerprint store %s failed on %s (%s: %s); encoding locally, retrying "
                        "in %.1f s with back-off", self.url, what, type(error).__name__, error, delay)

    def _ok(self) -> None:
        with self._lock:
            if self._delay:
                logger.info("Redis fingerprint store %s answers again", self.url)
            self._delay = 0.0

    @property
    def available(self) -> bool:
        """True unless a fault opened a back-off window that has not ended yet."""
        with self._lock:
            return time.monotonic() >= self._down_until

    # -- the interface -----------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """One ``MGET`` for all keys; a fault, a missing or a bad value is ``None``."""
        keys = [check_key(k) for k in keys]
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = self.client.mget([self.prefix + k for k in keys])
        except self._faults as e:
            self._fault("get", e)
            return [None] * len(keys)
        except self._response_error as e:
            self._refused("get", e)
            return [None] * len(keys)
        self._ok()
        if not isinstance(values, list) or len(values) != len(keys):
            self._count_error("response", "get", RuntimeError(f"MGET answered {type(values).__name__}"))
            return [None] * len(keys)
        return [self._decode(k, v) for k, v in zip(keys, values)]

    def _decode(self, key: str, value: Any) -> CacheEntry | None:
        if value is None:
            return None
        try:
            if not isinstance(value, (bytes, bytearray)):
                raise CorruptEntry(f"value of type {type(value).__name__}")
            return decode_entry(bytes(value), key)
        except CorruptEntry as e:
            with self._lock:
                self._corrupt += 1
            self._warn_once("corrupt", "ignoring bad fingerprint entry %s%s in Redis (%s); it will be "
                            "rebuilt", self.prefix, key[:16], e)
            return None

    def _refused(self, what: str, error: BaseException) -> None:
        """A command refused: the connection's own set-up (no or wrong password, a database the server does
        not have) fails every command alike, so it opens the back-off window as a fault does; any other
        refusal (``OOM`` for a write) is counted and the next call asks again."""
        if str(error).split(" ", 1)[0].upper() in _SETUP_REFUSALS or "DB index" in str(error):
            self._fault(what, error)
        else:
            self._count_error("response", what, error)

    def _count_error(self, category: str, what: str, error: BaseException) -> None:
        with self._lock:
            self._errors += 1
        self._warn_once(category, "Redis fingerprint store %s refused %s (%s: %s); encoding locally",
                        self.url, what, type(error).__name__, error)

    def has_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys hold an entry of this format for their key: pipelined ``GETRANGE`` of each value's
        header (tens of bytes, not the value), so garbage or an entry another writer got wrong under our
        key is not stored and a pre-warm rewrites it; ``False`` on a fault."""
        keys = [check_key(k) for k in keys]
        return [starts_entry(head, k) for head, k in zip(self._heads(keys, 0), keys)]

    def has_arrays(self, keys: Sequence[str], prefix: str) -> list[bool]:
        """Which keys hold an entry of this format with an array named ``prefix...`` among the arrays its
        first bytes name (:func:`~semtoken_rag.fileformat.array_names`; one pipelined ``GETRANGE`` each, as
        :meth:`has_many`); ``False`` on a fault."""
        keys = [check_key(k) for k in keys]
        return [has_array(array_names(head, k), prefix) for head, k in zip(self._heads(keys, NAMES_PEEK), keys)]

    def _heads(self, keys: list[str], extra: int) -> list[bytes]:
        """Each key's value's first ``header_size(key) + extra`` bytes (``b""`` for a missing key, a value of
        another type, or all of them on a fault)."""
        if not keys or not self._available():
            return [b""] * len(keys)
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.getrange(self.prefix + k, 0, header_size(k) + extra - 1)
        try:
            found = pipe.execute(raise_on_error=False)
        except self._faults as e:
            self._fault("exists", e)
            return [b""] * len(keys)
        except self._response_error as e:
            self._refused("exists", e)
            return [b""] * len(keys)
        self._ok()
        return [bytes(f) if isinstance(f, (bytes, bytearray)) else b"" for f in found]

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        """``SET`` every entry in pipelines of a few MB; faults are counted, never raised."""
        pending, size = [], 0
        for key, entry in items:
            if not isinstance(entry, CacheEntry):
                raise TypeError(f"entry must be a CacheEntry, got {type(entry).__name__}")
            data = encode_entry(check_key(key), entry)
            pending.append((self.prefix + key, data))
            size += len(data)
            if size >= _PIPELINE_BYTES:
                self._write(pending)
                pending, size = [], 0
        if pending:
            self._write(pending)

    def _write(self, pending: list[tuple[str, bytes]]) -> None:
        if not self._available():
            return
        pipe = self.client.pipeline(transaction=False)
        for name, data in pending:
            pipe.set(name, data, px=self.ttl_ms)
        try:
            results = pipe.execute(raise_on_error=False)
        except self._faults as e:
            self._fault("put", e)
            return
        except self._response_error as e:
            self._refused("put", e)
            return
        self._ok()
        refused = [r for r in results if isinstance(r, Exception)]
        with self._lock:
            self._writes += len(results) - len(refused)
        if refused:
            self._count_error("refused", f"{len(refused)} of {len(results)} writes", refused[0])

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(writes=self._writes, corrupt=self._corrupt, errors=self._errors)

    @property
    def skipped(self) -> int:
        """Calls answered locally inside a back-off window (no network)."""
        with self._lock:
            return self._skipped

    def clear(self) -> None:
        """Delete this encoder's entries (``SCAN`` + ``UNLINK``); other keys in the database stay."""
        try:
            batch = []
            for name in self.client.scan_iter(match=self.prefix + "*", count=_SCAN_COUNT):
                batch.append(name)
                if len(batch) >= _SCAN_COUNT:
                    self.client.unlink(*batch)
                    batch = []
            if batch:
                self.client.unlink(*batch)
        except self._faults as e:
            self._fault("clear", e)

    def close(self) -> None:
        """Close the idle connections (a later call reconnects). A connection in use by a call in flight (of
        an engine that shares this store, or of this one in another thread) is left to finish its command:
        cutting it made that call fail as if the server were down, log an outage and open the back-off
        window. It goes back to the pool when done, and is closed with the pool."""
        pool = getattr(self.client, "connection_pool", None)
        try:
            if pool is not None:
                pool.disconnect(inuse_connections=False)
            else:
                self.client.close()
        except self._faults:
            pass

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}, ttl_ms={self.ttl_ms})"
