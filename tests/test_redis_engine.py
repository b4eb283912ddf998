"""The engine on a Redis store (real server, real encoder): replicas share, faults never fail a call."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("redis")

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.diskstore import DirectoryStore
from semtoken_rag.keys import cache_key
from semtoken_rag.redis_store import RedisStore

QUERY = "who got the first nobel prize in physics"


def _out(res):
    return [(c.text, c.kept_spans) for c in res.chunks]


def _replica(url: str, **fields) -> SemToken:
    return SemToken(SemTokenConfig(device="cpu", store=url, **fields))


def test_second_replica_encodes_only_the_query(redis_url, nobel):
    first, second = _replica(redis_url), _replica(redis_url)
    assert isinstance(first.cache.backend, RedisStore)
    a = first.compress(nobel, QUERY, rate=0.4)
    assert a.encoder_calls >= 1 and a.cache_hits == 0
    assert first.cache.flush(timeout=30)  # (written on a worker thread: store_write_behind)
    b = second.compress(nobel, QUERY, rate=0.4)
    assert b.encoder_calls == 0 and b.cache_hits == len(nobel)  # every chunk from Redis
    assert _out(a) == _out(b)
    s = second.cache_stats()
    assert (s.disk_hits, s.store_errors) == (len(nobel), 0)
    c = second.compress(nobel, QUERY, rate=0.4)  # now from the memory LRU in front
    assert c.cache_hits == len(nobel) and second.cache_stats().disk_hits == len(nobel)


def test_close_releases_the_connections_and_a_later_call_reconnects(redis_url, nobel):
    import redis

    monitor = redis.Redis.from_url(redis_url)
    writer = _replica(redis_url)
    writer.compress(nobel[:2], QUERY, rate=0.4)
    writer.cache.flush()
    before = len(monitor.client_list())
    with _replica(redis_url) as reader:
        assert reader.compress(nobel[:2], QUERY, rate=0.4).cache_hits == 2
        assert len(monitor.client_list()) > before  # the reader's connection
    deadline = time.monotonic() + 5  # (the server notes a closed socket on its next event-loop turn: under
    while len(monitor.client_list()) > before and time.monotonic() < deadline:  # load, after this returns)
        time.sleep(0.01)
    assert len(monitor.client_list()) == before
    writer.compress(nobel[2:], QUERY, rate=0.4)
    writer.cache.flush()
    reader.clear_caches()  # (memory only: the next hits come from Redis)
    res = reader.compress(nobel, QUERY, rate=0.4)
    assert res.cache_hits == len(nobel) and reader.cache_stats().store_errors == 0


def test_closing_one_of_the_engines_sharing_a_store_leaves_the_others_connected(redis_url, nobel):
    """Registry engines that differ in their tokenizer share one store: closing one (or leaving its with
    block) must not cut the others' connections mid-call; the last one closes them."""
    import redis

    from semtoken_rag.registry import clear_registry, shared_engine

    clear_registry()
    monitor = redis.Redis.from_url(redis_url)
    a = shared_engine(SemTokenConfig(device="cpu", store=redis_url))
    b = shared_engine(SemTokenConfig(device="cpu", store=redis_url, tokenizer="cl100k_base"))
    assert a.cache is b.cache and a.parts.users == 2
    a.compress(nobel, QUERY, rate=0.4)
    before = len(monitor.client_list())
    a.close()
    a.close()  # (idempotent: one engine releases its share once)
    assert len(monitor.client_list()) == before and b.parts.users == 1
    b.clear_caches()
    assert b.compress(nobel, QUERY, rate=0.4).cache_hits == len(nobel) and b.cache_stats().store_errors == 0
    b.close()
    assert len(monitor.client_list()) < before
    clear_registry()


def test_redis_killed_mid_run_never_fails_nor_changes_output(redis_restartable, engine, nobel):
    reference = [_out(engine.compress(nobel[i:] + nobel[:i], QUERY, rate=0.4)) for i in range(4)]
    replica = _replica(redis_restartable.url, cache_max_bytes=0, store_timeout_seconds=0.05)
    for i in range(4):  # fills Redis
        assert _out(replica.compress(nobel[i:] + nobel[:i], QUERY, rate=0.4)) == reference[i]
    replica.cache.flush()  # (what is queued for Redis would answer the next calls)
    redis_restartable.stop()
    for i in range(4):
        res = replica.compress(nobel[i:] + nobel[:i], QUERY, rate=0.4)
        assert _out(res) == reference[i] and res.encoder_calls >= 1  # encoded locally
        replica.cache.flush()  # (the write meant for the dead store fails on the worker thread; until
        # then its entries answer this replica, which keeps no memory cache)
    errors = replica.cache_stats().store_errors
    assert errors >= 1
    redis_restartable.start()  # empty, same port
    replica.cache.backend._down_until = 0.0  # end the back-off window now instead of sleeping
    first = replica.compress(nobel, QUERY, rate=0.4)  # a miss: refills Redis
    again = replica.compress(nobel, QUERY, rate=0.4)
    replica.cache.flush()
    assert _out(first) == _out(again) == reference[0]
    assert again.cache_hits == len(nobel) and again.encoder_calls == 0  # reconnected
    assert replica.cache_stats().store_errors == errors


def test_garbage_and_wrong_entries_under_real_keys_are_rebuilt(redis_url, redis_server, engine, nobel):
    expected = _out(engine.compress(nobel, QUERY, rate=0.4))
    writer = _replica(redis_url)
    writer.compress(nobel, QUERY, rate=0.4)
    writer.cache.flush()
    store = writer.cache.backend
    ns = writer.encoder.identity
    with redis_server.client() as client:
        k0, k1, k2 = (store.prefix + cache_key(c, ns) for c in nobel[:3])
        client.set(k0, b"\x00garbage" * 10)  # fails to decode
        client.set(k1, client.get(k2))  # a valid entry, but of another key: decode refuses it
    reader = _replica(redis_url)
    res = reader.compress(nobel, QUERY, rate=0.4)
    assert _out(res) == expected and res.cache_hits == len(nobel) - 2
    reader.cache.flush()
    s = reader.cache_stats()
    assert s.corrupt_entries == 2 and s.store_errors == 0
    assert _replica(redis_url).compress(nobel, QUERY, rate=0.4).cache_hits == len(nobel)  # overwritten


def test_prewarm_then_query_time_is_all_hits(redis_url, nobel):
    ingest = _replica(redis_url)
    assert ingest.prewarm(nobel + nobel[:1] + ["", "   "], batch_size=2) == len(nobel)  # dedup, blanks
    assert ingest.prewarm(nobel) == 0  # resume: all stored
    serving = _replica(redis_url)
    res = serving.compress(nobel, QUERY, rate=0.4)
    assert res.encoder_calls == 0 and res.cache_hits == len(nobel)
    with pytest.raises(TypeError, match="chunks"):
        serving.prewarm("a single string")
    with pytest.raises(ValueError, match="batch_size"):
        serving.prewarm(nobel, batch_size=0)


def test_store_config(tmp_path, redis_url):
    assert SemTokenConfig(store=redis_url).store == redis_url
    with pytest.raises(ValueError, match="not supported"):
        SemTokenConfig(store="http://cache:6379")
    with pytest.raises(ValueError, match="not both"):
        SemTokenConfig(store=redis_url, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="store_timeout_seconds"):
        SemTokenConfig(store=redis_url, store_timeout_seconds=0)
    # Redis counts milliseconds: a shorter TTL was accepted here and refused when the store opened
    with pytest.raises(ValueError, match="store_ttl_seconds"):
        SemTokenConfig(store=redis_url, store_ttl_seconds=0.0005)
    # redis-py reads a database that is not a number as 0 ("/1/2" as 12): another database, silently
    for bad in ("redis://cache:6379/fingerprints", "redis://cache:6379/1/2", "unix:///run/r.sock?db=x"):
        with pytest.raises(ValueError, match="database must be a number"):
            SemTokenConfig(store=bad)
    # what redis-py reads as a number stays accepted: a trailing slash, spaces, an empty ?db= (database 0)
    for good in ("unix:///run/r.sock?db=2", "redis://cache:6379/0/", "redis://cache:6379?db=", "redis://h/ 1"):
        assert SemTokenConfig(store=good).store == good
    engine = SemToken(SemTokenConfig(device="cpu", store=(tmp_path / "fp").as_uri()))
    assert isinstance(engine.cache.backend, DirectoryStore) and engine.cache.backend.path == tmp_path / "fp"
    assert SemToken(SemTokenConfig(device="cpu", store=redis_url, store_ttl_seconds=60)).cache.backend.ttl_ms \
        == 60_000


def test_a_redis_url_scheme_in_capitals_works_as_the_config_takes_it(redis_url, nobel):
    upper = "REDIS" + redis_url[len("redis"):]
    SemToken(SemTokenConfig(device="cpu", store=upper)).prewarm(nobel[:2])
    assert SemToken(SemTokenConfig(device="cpu", store=redis_url)).compress(nobel[:2], "q").cache_hits == 2
