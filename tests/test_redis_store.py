"""RedisStore against a real redis-server: round trips, namespaces, TTL, and every fault the issue names."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

pytest.importorskip("redis")

from semtoken_rag.fileformat import FORMAT_VERSION, CacheEntry, encode_entry
from semtoken_rag.keys import cache_key
from semtoken_rag.redis_store import RedisStore, encoder_tag, safe_url


def _entry(seed: int, n: int = 5) -> CacheEntry:
    rng = np.random.default_rng(seed)
    units = np.stack([np.arange(n) * 4, np.arange(n) * 4 + 3], axis=1).astype(np.int32)
    return CacheEntry({"fingerprints": rng.standard_normal((n, 8)).astype(np.float16), "units": units}, 0.01)


def _key(i: int, ns: str = "enc") -> str:
    return cache_key(f"chunk number {i}", ns)


def _same(a: CacheEntry, b: CacheEntry) -> bool:
    return set(a.arrays) == set(b.arrays) and all(np.array_equal(a[k], b[k]) for k in a.arrays)


def test_round_trip_one_mget_and_misses(redis_url):
    store = RedisStore(redis_url, namespace="enc")
    items = [(_key(i), _entry(i)) for i in range(20)]
    store.put_many(items)
    got = store.get_many([k for k, _ in items] + [_key(99)])
    assert all(_same(g, e) for g, (_, e) in zip(got[:20], items))
    assert got[20] is None
    assert store.has_many([_key(0), _key(99)]) == [True, False]
    s = store.stats()
    assert (s.writes, s.errors, s.corrupt) == (20, 0, 0)


def test_values_are_the_binary_entry_format_under_a_namespaced_key(redis_url, redis_server):
    store = RedisStore(redis_url, namespace="enc")
    store.put(_key(1), _entry(1))
    with redis_server.client() as client:
        name = f"semtoken-rag:fp{FORMAT_VERSION}:{encoder_tag('enc')}:{_key(1)}"
        assert client.get(name) == encode_entry(_key(1), _entry(1))
        assert client.ttl(name) == -1  # no TTL by default
        old = f"semtoken-rag:fp{FORMAT_VERSION - 1}:{encoder_tag('enc')}:{_key(2)}"
        client.set(old, b"SEMTKFP\x00\x01 a value of the previous format")
    assert store.get(_key(2)) is None and store.stats().corrupt == 0  # an older format: a plain miss


def test_encoders_do_not_share_and_clear_is_per_encoder(redis_url, redis_server):
    a, b = RedisStore(redis_url, namespace="enc-a"), RedisStore(redis_url, namespace="enc-b")
    a.put(_key(1), _entry(1))
    b.put(_key(1), _entry(2))  # same cache key, another encoder namespace
    assert _same(a.get(_key(1)), _entry(1)) and _same(b.get(_key(1)), _entry(2))
    with redis_server.client() as client:
        client.set("unrelated", b"keep me")
        a.clear()
        assert a.get(_key(1)) is None and b.get(_key(1)) is not None
        assert client.get("unrelated") == b"keep me"


def test_ttl_expires_entries(redis_url, redis_server):
    store = RedisStore(redis_url, namespace="enc", ttl_seconds=0.3)
    store.put(_key(1), _entry(1))
    with redis_server.client() as client:
        assert 0 < client.pttl(f"{store.prefix}{_key(1)}") <= 300
    assert store.get(_key(1)) is not None
    time.sleep(0.5)
    assert store.get(_key(1)) is None


def test_garbage_values_are_counted_misses(redis_url, redis_server, caplog):
    store = RedisStore(redis_url, namespace="enc")
    good = encode_entry(_key(2), _entry(2))
    with redis_server.client() as client:
        client.set(store.prefix + _key(0), b"not an entry at all")
        client.set(store.prefix + _key(1), good[:-1] + bytes([good[-1] ^ 1]))  # checksum broken
        client.set(store.prefix + _key(3), good)  # valid bytes of another key
        client.rpush(store.prefix + _key(4), b"a list, not a string")
    with caplog.at_level(logging.WARNING, logger="semtoken_rag.redis_store"):
        got = store.get_many([_key(i) for i in range(5)])
    assert got == [None] * 5
    assert store.stats().corrupt == 3  # the list is not a string value: MGET answers nil
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # logged once
    store.put(_key(0), _entry(0))  # the engine re-encodes and overwrites
    assert _same(store.get(_key(0)), _entry(0))
    # what a pre-warm skips: only entries of this format for their key (garbage, another key's bytes and a
    # list were "stored" to EXISTS, so a pre-warm left them and replicas missed every time)
    assert store.has_many([_key(i) for i in range(6)]) == [True, False, False, False, False, False]


def test_down_at_start_never_raises_and_backs_off(caplog):
    from semtoken_rag.testing import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", namespace="enc", timeout_seconds=0.05,
                       backoff_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="semtoken_rag.redis_store"):
        assert store.get_many([_key(1), _key(2)]) == [None, None]
        store.put(_key(1), _entry(1))  # inside the back-off window: dropped, no network
        assert store.get_many([_key(1)]) == [None]
    assert store.stats().errors == 1 and store.skipped == 2 and not store.available
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_killed_mid_run_then_restarted_reconnects(redis_restartable):
    store = RedisStore(redis_restartable.url, namespace="enc", timeout_seconds=0.1, backoff_seconds=0.1)
    store.put(_key(1), _entry(1))
    assert store.get(_key(1)) is not None
    redis_restartable.stop()
    assert store.get(_key(1)) is None  # a miss, not an exception
    errors = store.stats().errors
    assert errors >= 1
    redis_restartable.start()  # same port, empty
    time.sleep(0.25)  # past the back-off window
    store.put(_key(2), _entry(2))
    assert _same(store.get(_key(2)), _entry(2))
    assert store.available and store.stats().errors == errors


def test_slow_server_costs_at_most_the_timeout(redis_restartable):
    store = RedisStore(redis_restartable.url, namespace="enc", timeout_seconds=0.1)
    store.put(_key(1), _entry(1))
    with redis_restartable.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # the server answers nobody for 1 s
    t0 = time.perf_counter()
    assert store.get(_key(1)) is None
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed  # bounded by timeout_seconds, not by the 1 s sleep
    assert store.stats().errors == 1


def test_maxmemory_eviction_and_refused_writes_are_misses_or_counted(redis_restartable):
    with redis_restartable.client() as admin:
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 2 * 2**20)  # 2 MB of room
        admin.config_set("maxmemory-policy", "allkeys-lru")
        store = RedisStore(redis_restartable.url, namespace="enc")
        big = [(_key(i), _entry(i, n=4000)) for i in range(100)]  # 64 KB each, 6.4 MB in all
        store.put_many(big)
        got = store.get_many([k for k, _ in big])
        kept = [g for g in got if g is not None]
        assert 0 < len(kept) < len(big)  # evicted entries are plain misses
        assert all(_same(g, e) for g, (_, e) in zip(got, big) if g is not None)
        assert store.stats().errors == 0
        admin.config_set("maxmemory-policy", "noeviction")
        store.put_many([(_key(1000 + i), _entry(i, n=4000)) for i in range(50)])
        assert store.stats().errors >= 1  # OOM refusals counted, never raised


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="redis://"):
        RedisStore("http://localhost:6379", namespace="enc")
    with pytest.raises(ValueError, match="timeout_seconds"):
        RedisStore("redis://127.0.0.1:1/0", namespace="enc", timeout_seconds=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        RedisStore("redis://127.0.0.1:1/0", namespace="enc", ttl_seconds=-1)
    with pytest.raises(ValueError, match="database must be a number.*'abc'"):
        RedisStore("redis://:hunter2@127.0.0.1:1/abc", namespace="enc")
    store = RedisStore("redis://127.0.0.1:1/0", namespace="enc")
    with pytest.raises(ValueError, match="cache keys"):
        store.get_many(["../etc/passwd"])
    with pytest.raises(TypeError, match="CacheEntry"):
        store.put_many([(_key(1), b"bytes")])
    assert safe_url("redis://:hunter2@h:1/0") == "redis://:***@h:1/0"
    assert "hunter2" not in repr(RedisStore("redis://:hunter2@127.0.0.1:1/0", namespace="enc"))


def test_something_else_at_the_url_or_a_missing_database_backs_off(redis_url, caplog):
    """A server that is not Redis (InvalidResponse) or a database it does not have (a refusal before any
    command runs) fails every call alike: one fault, then the back-off window, not two reconnects a call."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(1)
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        host, port, _ = redis_url.removeprefix("redis://").replace("/", ":").split(":")
        for url in (f"redis://127.0.0.1:{srv.getsockname()[1]}/0", f"redis://{host}:{port}/99"):
            store = RedisStore(url, namespace="enc", timeout_seconds=0.5, backoff_seconds=5)
            with caplog.at_level(logging.WARNING, logger="semtoken_rag.redis_store"):
                for _ in range(5):
                    assert store.get_many([_key(1)]) == [None]
                    store.put(_key(1), _entry(1))
                    assert store.has_many([_key(1)]) == [False]
            assert store.stats().errors == 1 and store.skipped == 14 and not store.available, url
        assert len(accepted) == 1
    finally:
        srv.close()


def test_close_leaves_a_connection_in_use_to_finish_and_closes_the_idle_ones(redis_url):
    """close() while another thread's command is in flight (an engine that shares the store, or this one's
    other calls): cutting that connection failed the call as an outage and opened the back-off window."""
    store = RedisStore(redis_url, namespace="enc")
    store.put("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}))  # (a connection, now idle)
    pool = store.client.connection_pool
    idle, busy = pool.get_connection(), pool.get_connection()  # busy stays checked out: a command in flight
    idle.connect()
    busy.connect()
    pool.release(idle)
    store.close()
    assert idle._sock is None  # idle: closed
    assert busy._sock is not None  # in use: left to finish its command
    busy.send_command("PING")
    assert busy.read_response() in (b"PONG", "PONG")
    pool.release(busy)
    assert [e is not None for e in store.get_many(["abcd1234"])] == [True]  # the store goes on (reconnecting)
    assert store.stats().errors == 0 and store.available
