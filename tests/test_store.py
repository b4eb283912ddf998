"""Tests for semtoken_rag.store, diskstore and lru: real files, real threads, real processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import read_only_dir

from semtoken_rag.diskstore import DirectoryStore
from semtoken_rag.fileformat import DIGEST_SIZE, FORMAT_VERSION, MAGIC, CacheEntry, checksum
from semtoken_rag.keys import cache_key
from semtoken_rag.lru import ByteLRU
from semtoken_rag.store import (
    CacheStats,
    FingerprintStore,
    LayeredCache,
    MemoryStore,
    StoreStats,
)

LOGGER = "semtoken_rag"  # the store and diskstore modules log under it


def make_entry(seed: int, n: int = 150, d: int = 384, seconds: float = 0.25) -> CacheEntry:
    rng = np.random.default_rng(seed)
    fp = rng.standard_normal((n, d)).astype(np.float16)
    offsets = np.cumsum(rng.integers(1, 8, size=(n, 2)), axis=0).astype(np.int32)
    return CacheEntry({"fingerprints": fp, "offsets": offsets}, encode_seconds=seconds)


def make_cache(max_bytes: int = 256 * 2**20, cache_dir: Path | None = None, *,
               max_disk_bytes: int | None = None, fsync: bool = True) -> LayeredCache:
    disk = None if cache_dir is None else DirectoryStore(cache_dir, max_disk_bytes=max_disk_bytes, fsync=fsync)
    return LayeredCache(MemoryStore(max_bytes), disk)


def assert_same(a: CacheEntry | None, b: CacheEntry) -> None:
    assert a is not None
    assert list(a.arrays) == list(b.arrays)
    for name in b.arrays:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].tobytes() == b[name].tobytes()
    assert a.encode_seconds == b.encode_seconds


def key(i: int) -> str:
    return cache_key(f"chunk number {i}", "test-encoder|v1")


def entry_path(root: Path, k: str) -> Path:
    return root / k[:2] / f"{k}.stfp"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(LOGGER + ".") and r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- ByteLRU


def test_byte_lru_bound_eviction_and_oversize() -> None:
    lru: ByteLRU[bytes] = ByteLRU(max_bytes=10, sizeof=len)
    assert lru.put("a", b"1234") and lru.put("b", b"5678")
    assert lru.get("a") == b"1234"  # a is now the most recently used
    assert lru.put("c", b"abcd")  # evicts b
    assert lru.get("b") is None and sorted(lru.keys()) == ["a", "c"] and lru.nbytes == 8 and lru.evictions == 1
    assert lru.put("a", b"123")  # replacing re-counts
    assert lru.nbytes == 7
    assert not lru.put("big", b"x" * 11) and "big" not in lru and lru.nbytes == 7
    assert lru.pop("a") == b"123" and lru.pop("a") is None and lru.nbytes == 4 and len(lru) == 1
    lru.clear()
    assert lru.nbytes == 0 and len(lru) == 0
    off: ByteLRU[bytes] = ByteLRU(0, sizeof=len)
    assert not off.put("a", b"x") and len(off) == 0 and off.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLRU(-1, sizeof=len)
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLRU(True, sizeof=len)


# ----------------------------------------------------------------------------- memory tier


def test_layer_rejects_bad_keys_and_entries() -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="cache keys"):
        cache.put("../../etc/passwd", make_entry(0, n=2, d=2))
    with pytest.raises(TypeError, match="CacheEntry"):
        cache.put(key(0), {"fingerprints": np.ones((2, 3), np.float16)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(max_bytes=-1)
    with pytest.raises(TypeError, match="FingerprintStore"):
        LayeredCache(MemoryStore(), backend=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_disk_bytes"):
        DirectoryStore("/tmp/x", max_disk_bytes=-5)
    assert "../../etc/passwd" not in cache and 17 not in cache


def test_round_trip_is_bit_identical_and_counts() -> None:
    cache = make_cache()
    entry = make_entry(1)
    assert cache.get(key(1)) is None
    cache.put(key(1), entry)
    assert_same(cache.get(key(1)), entry)
    assert key(1) in cache and key(2) not in cache and len(cache) == 1
    s = cache.stats()
    assert isinstance(s, CacheStats)
    assert (s.hits, s.misses, s.disk_hits, s.entries) == (1, 1, 0, 1)
    assert s.memory_bytes == entry.nbytes and s.encoder_seconds_saved == 0.25


def test_lru_eviction_at_byte_bound() -> None:
    entries = {i: make_entry(i, n=20, d=16) for i in range(4)}
    size = entries[0].nbytes
    cache = make_cache(max_bytes=3 * size)
    for i in range(3):
        cache.put(key(i), entries[i])
    assert cache.get(key(0)) is not None  # 0 is now the most recently used
    cache.put(key(3), entries[3])  # evicts 1, the least recently used
    assert cache.get(key(1)) is None
    for i in (0, 2, 3):
        assert_same(cache.get(key(i)), entries[i])
    s = cache.stats()
    assert s.evictions == 1 and s.entries == 3 and s.memory_bytes == 3 * size <= cache.max_bytes


def test_oversized_entry_and_disabled_memory(tmp_path: Path) -> None:
    big = make_entry(5)
    mem_only = make_cache(max_bytes=0)
    mem_only.put(key(5), big)
    assert mem_only.get(key(5)) is None and len(mem_only) == 0
    small_mem = make_cache(max_bytes=1000, cache_dir=tmp_path)
    small_mem.put(key(5), big)  # too big for memory, still persisted
    assert len(small_mem) == 0
    assert_same(small_mem.get(key(5)), big)
    assert small_mem.stats().disk_hits == 1 and len(small_mem) == 0


def test_get_many_keeps_order_and_duplicates(tmp_path: Path) -> None:
    cache = make_cache(cache_dir=tmp_path)
    entries = {i: make_entry(i, n=3, d=4) for i in range(3)}
    cache.put_many([(key(i), entries[i]) for i in range(3)])
    cache.memory.clear()  # 0-2 now on disk only
    cache.put(key(1), entries[1])  # 1 in memory too
    got = cache.get_many([key(2), key(9), key(1), key(0), key(2)])
    assert got[1] is None
    for g, i in zip([got[0], got[2], got[3], got[4]], [2, 1, 0, 2]):
        assert_same(g, entries[i])
    s = cache.stats()
    assert (s.hits, s.misses, s.disk_hits) == (4, 1, 3)


# ----------------------------------------------------------------------------- backends behind the layer


class CountingStore(MemoryStore):
    """A real memory backend that records how often it is asked."""

    def __init__(self) -> None:
        super().__init__(1 << 30)
        self.calls: list[int] = []

    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        self.calls.append(len(keys))
        return super().get_many(keys)


class FaultyStore(FingerprintStore):
    """A backend that fails the way a network store does (down, garbage answers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def get_many(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        if self.mode == "short":
            return [None] * (len(keys) - 1)
        raise ConnectionError("store is down")

    def put_many(self, items: Iterable[tuple[str, CacheEntry]]) -> None:
        raise TimeoutError("store is slow")

    def stats(self) -> StoreStats:
        raise ConnectionError("store is down")

    def clear(self) -> None:
        raise ConnectionError("store is down")


def test_one_backend_call_per_get_many() -> None:
    backend = CountingStore()
    cache = LayeredCache(MemoryStore(1 << 20), backend)
    entries = {i: make_entry(i, n=4, d=8) for i in range(5)}
    backend.put_many([(key(i), entries[i]) for i in range(5)])
    cache.put(key(0), entries[0])
    got = cache.get_many([key(i) for i in range(7)])
    assert backend.calls == [6]  # one multi-get, for the six keys memory lacked
    assert [g is not None for g in got] == [True] * 5 + [False] * 2
    cache.get_many([key(i) for i in range(5)])  # all promoted to memory: no backend call
    assert backend.calls == [6]


@pytest.mark.parametrize("mode", ["down", "short"])
def test_backend_faults_are_misses_counted_and_logged_once(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = LayeredCache(MemoryStore(1 << 20), FaultyStore(mode))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    entry = make_entry(0, n=4, d=8)
    cache.put(key(0), entry)  # the backend put fails: no exception, memory still holds it
    assert_same(cache.get(key(0)), entry)
    for _ in range(3):
        assert cache.get_many([key(1), key(2)]) == [None, None]
    assert key(3) not in cache
    cache.clear()
    s = cache.stats()
    assert s.hits == 1 and s.misses == 6 and s.store_errors >= 5
    assert len(warnings_of(caplog)) == 1 and "miss" in warnings_of(caplog)[0].getMessage()


def test_rejected_entries_are_misses_counted_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    cache = make_cache()
    good, bad = make_entry(0, n=4, d=8), make_entry(1, n=4, d=8)
    cache.put_many([(key(0), good), (key(1), bad)])
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for _ in range(2):
        got = cache.get_many([key(0), key(1)], valid=lambda i, e: e is good)
        assert got[0] is good and got[1] is None
        cache.put(key(1), bad)
    raising = cache.get_many([key(1)], valid=lambda i, e: 1 / 0)  # a check that raises rejects
    assert raising == [None]
    s = cache.stats()
    assert s.invalid_entries == 3 and s.hits == 2 and s.misses == 3
    assert s.encoder_seconds_saved == pytest.approx(2 * good.encode_seconds)
    assert key(1) not in cache.memory
    assert len(warnings_of(caplog)) == 1 and "rebuilt" in warnings_of(caplog)[0].getMessage()


# ----------------------------------------------------------------------------- disk tier


def test_restart_starts_warm(tmp_path: Path) -> None:
    first = make_cache(cache_dir=tmp_path / "c")
    entries = {i: make_entry(i) for i in range(3)}
    for i, e in entries.items():
        first.put(key(i), e)
    files = sorted((tmp_path / "c").glob("*/*.stfp"))
    assert len(files) == 3 and all(f.parent.name == f.name[:2] for f in files)
    second = make_cache(cache_dir=tmp_path / "c")
    assert len(second) == 0
    for i, e in entries.items():
        assert_same(second.get(key(i)), e)
    assert_same(second.get(key(0)), entries[0])  # now served from memory
    s = second.stats()
    assert (s.hits, s.disk_hits, s.misses, s.entries) == (4, 3, 0, 3)
    assert s.encoder_seconds_saved == pytest.approx(0.75 + 0.25)
    assert not list((tmp_path / "c").rglob(".tmp-*"))
    second.clear()
    assert len(second) == 0 and not list((tmp_path / "c").glob("*/*.stfp"))


def _version_bump(data: bytes, other: bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into("<H", out, len(MAGIC), FORMAT_VERSION + 1)
    out[-DIGEST_SIZE:] = checksum(bytes(out[:-DIGEST_SIZE]))  # valid checksum, wrong version
    return bytes(out)


def _flip(data: bytes, other: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


CORRUPTIONS = {
    "truncated": lambda data, other: data[: len(data) // 2],
    "empty": lambda data, other: b"",
    "garbage": lambda data, other: np.random.default_rng(0).bytes(len(data)),
    "bitflip": _flip,
    "bad-magic": lambda data, other: b"XXXXXXXX" + data[8:],
    "foreign-key": lambda data, other: other,
    "wrong-version": _version_bump,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_files_are_misses_logged_once_and_repaired(tmp_path: Path, kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    writer = make_cache(cache_dir=tmp_path)
    entries = {i: make_entry(i, n=30, d=32) for i in range(3)}
    for i, e in entries.items():
        writer.put(key(i), e)
    path = {i: entry_path(tmp_path, key(i)) for i in entries}
    other = path[2].read_bytes()
    for i in (0, 1):
        path[i].write_bytes(CORRUPTIONS[kind](path[i].read_bytes(), other))

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reader = make_cache(cache_dir=tmp_path)
    assert reader.get(key(0)) is None
    assert key(1) not in reader
    assert reader.get(key(1)) is None
    assert_same(reader.get(key(2)), entries[2])
    assert len(warnings_of(caplog)) == 1  # once per store, then DEBUG
    assert "rebuilt" in warnings_of(caplog)[0].getMessage()
    s = reader.stats()
    assert s.misses == 2 and s.corrupt_entries >= 2 and s.hits == 1
    assert not path[0].exists()  # the bad file was removed

    reader.put(key(0), entries[0])  # the caller recomputes: the file is rewritten
    assert_same(make_cache(cache_dir=tmp_path).get(key(0)), entries[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_at_an_entry_path_is_a_miss_not_a_hang(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = entry_path(tmp_path, key(0))
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    (tmp_path / key(1)[:2]).mkdir(exist_ok=True)
    os.symlink(path, entry_path(tmp_path, key(1)))  # a link to the FIFO: same answer
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cache = make_cache(cache_dir=tmp_path)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(cache.get_many([key(0), key(1)])), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert got == [[None, None]]
    s = cache.stats()
    assert s.misses == 2 and s.corrupt_entries == 2
    assert len(warnings_of(caplog)) == 1 and "regular file" in warnings_of(caplog)[0].getMessage()


def test_unusable_directory_keeps_memory_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cache = make_cache(cache_dir=blocker / "cache")
    cache.put(key(1), make_entry(1))
    cache.put(key(2), make_entry(2))
    assert_same(cache.get(key(1)), make_entry(1))
    assert cache.get(key(3)) is None  # reading under a file is a plain miss
    assert len(warnings_of(caplog)) == 1 and "cannot be created" in warnings_of(caplog)[0].getMessage()
    assert cache.stats().store_errors == 3 and cache.stats().disk_writes == 0


def test_deleted_directory_is_recreated_on_the_next_write(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = make_cache(cache_dir=root)
    cache.put(key(0), make_entry(0, n=4, d=8))
    shutil.rmtree(root)
    assert cache.get(key(0)) is not None  # memory still has it
    cache.put(key(1), make_entry(1, n=4, d=8))
    assert entry_path(root, key(1)).is_file()
    assert_same(make_cache(cache_dir=root).get(key(1)), make_entry(1, n=4, d=8))
    shutil.rmtree(root)
    cache.put(key(2), make_entry(2, n=4, d=8))
    assert entry_path(root, key(2)).is_file() and cache.stats().disk_writes == 3


def test_unwritable_directory_is_still_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = {i: make_entry(i, n=4, d=8) for i in range(3)}
    writer = make_cache(cache_dir=tmp_path)
    for i in range(2):
        writer.put(key(i), entries[i])
    (tmp_path / key(2)[:2]).write_text("in the way")  # this shard cannot be written (as any user)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reader = make_cache(cache_dir=tmp_path)
    reader.put(key(2), entries[2])  # fails soft
    reader.memory.clear()
    got = reader.get_many([key(0), key(1), key(2)])
    assert got[2] is None
    assert_same(got[0], entries[0])
    assert_same(got[1], entries[1])
    assert reader.stats().disk_hits == 2 and reader.stats().store_errors == 1
    assert len(warnings_of(caplog)) == 1


def test_read_only_directory_is_still_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = {i: make_entry(i, n=4, d=8) for i in range(3)}
    ro = tmp_path / "ro"
    writer = make_cache(cache_dir=ro)
    for i in range(2):
        writer.put(key(i), entries[i])
    with read_only_dir(ro):
        caplog.set_level(logging.WARNING, logger=LOGGER)
        reader = make_cache(cache_dir=ro)
        assert_same(reader.get(key(0)), entries[0])
        assert_same(reader.get(key(1)), entries[1])
        reader.put(key(2), entries[2])
        reader.put(key(2), entries[2])
        assert_same(reader.get(key(2)), entries[2])  # from memory
        assert reader.stats().disk_hits == 2 and len(warnings_of(caplog)) == 1


def test_failed_write_warns_once_and_leaves_no_temp_files(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cache = make_cache(cache_dir=tmp_path)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for i in range(2):  # the shard directory is taken by a file: writing must fail
        (tmp_path / key(i)[:2]).write_text("in the way")
        cache.put(key(i), make_entry(i, n=4, d=8))
        assert_same(cache.get(key(i)), make_entry(i, n=4, d=8))
    assert len(warnings_of(caplog)) == 1
    assert not list(tmp_path.rglob(".tmp-*"))


def test_disk_bound_prunes_oldest(tmp_path: Path) -> None:
    probe = make_cache(cache_dir=tmp_path / "probe")
    probe.put(key(0), make_entry(0, n=20, d=32))
    file_size = next((tmp_path / "probe").glob("*/*.stfp")).stat().st_size
    bound = 5 * file_size
    cache = make_cache(max_bytes=0, cache_dir=tmp_path / "c", max_disk_bytes=bound)
    for i in range(20):
        cache.put(key(i), make_entry(i, n=20, d=32))
        time.sleep(0.002)  # distinct mtimes
    files = list((tmp_path / "c").glob("*/*.stfp"))
    assert 0 < len(files) <= 5 and sum(f.stat().st_size for f in files) <= bound
    assert cache.backend.disk_bytes() <= bound  # type: ignore[union-attr]
    assert_same(cache.get(key(19)), make_entry(19, n=20, d=32))  # the newest survives
    assert cache.get(key(0)) is None


def test_processes_sharing_a_directory_keep_it_near_the_bound(tmp_path: Path) -> None:
    """Three stores on one directory (three worker processes: each sees only its own writes in its estimate)
    writing in turn: together they reached about 3x the bound, and stayed there; now each also rescans after
    a tenth of the bound of its own writes, so the directory stays within about (1 + 3 x 0.1) x the bound."""
    probe = make_cache(cache_dir=tmp_path / "probe")
    probe.put(key(0), make_entry(0, n=20, d=32))
    file_size = next((tmp_path / "probe").glob("*/*.stfp")).stat().st_size
    bound = 40 * file_size
    workers = [DirectoryStore(tmp_path / "c", max_disk_bytes=bound) for _ in range(3)]
    peak = 0
    for i in range(300):
        workers[i % 3].put(key(i), make_entry(i, n=20, d=32))
        peak = max(peak, workers[0].disk_bytes())
    assert peak <= 1.35 * bound + file_size, (peak / bound)
    assert workers[0].disk_bytes() <= 1.35 * bound


@pytest.mark.parametrize("background", [False, True])
def test_an_unbounded_directory_removes_stale_temp_files_at_its_first_write(tmp_path: Path, background) -> None:
    """A writer killed mid-write leaves its temp file; only the prune's scan removed them, and an unbounded
    store never prunes (the engine's store sweeps on a thread of its own)."""
    import os

    store = DirectoryStore(tmp_path, max_disk_bytes=None, prune_in_background=background)
    shard = tmp_path / key(1)[:2]
    shard.mkdir(parents=True, exist_ok=True)
    stale, fresh = shard / ".tmp-killed.part", shard / ".tmp-writing.part"
    stale.write_bytes(b"half an entry")
    fresh.write_bytes(b"another process, now")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    store.put(key(1), make_entry(1, n=4, d=8))
    assert store.wait_for_prune(timeout=30)
    assert not stale.exists() and fresh.exists()  # (a temp file being written now is left alone)
    assert_same(store.get(key(1)), make_entry(1, n=4, d=8))


def test_disk_bound_keeps_recently_read_files(tmp_path: Path) -> None:
    probe = make_cache(cache_dir=tmp_path / "probe")
    probe.put(key(0), make_entry(0, n=20, d=32))
    file_size = next((tmp_path / "probe").glob("*/*.stfp")).stat().st_size
    cache = make_cache(max_bytes=0, cache_dir=tmp_path / "c", max_disk_bytes=4 * file_size + 10)
    for i in range(4):
        cache.put(key(i), make_entry(i, n=20, d=32))
        time.sleep(0.01)
    assert cache.get(key(0)) is not None  # read: its mtime is refreshed
    time.sleep(0.01)
    cache.put(key(4), make_entry(4, n=20, d=32))  # over the bound: the oldest unread ones go
    assert cache.get(key(0)) is not None and cache.get(key(4)) is not None and cache.get(key(1)) is None


def test_bytes_per_cached_chunk(tmp_path: Path) -> None:
    entry = make_entry(0, n=150, d=384)
    payload = 150 * 384 * 2 + 150 * 2 * 4
    assert payload <= entry.nbytes <= payload + 1024
    cache = make_cache(cache_dir=tmp_path)
    cache.put(key(0), entry)
    size = next(tmp_path.glob("*/*.stfp")).stat().st_size
    assert payload < size <= payload + 256


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("with_dir", [False, True], ids=["memory", "disk"])
def test_threads_hammering_one_cache(tmp_path: Path, with_dir: bool) -> None:
    n_keys, n_threads, n_ops = 40, 8, 500
    entries = {i: make_entry(i, n=8, d=16, seconds=0.5) for i in range(n_keys)}
    size = entries[0].nbytes
    cache = make_cache(max_bytes=15 * size, cache_dir=tmp_path if with_dir else None, fsync=False)
    errors: list[BaseException] = []
    gets = [0] * n_threads
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            start.wait()
            for _ in range(n_ops):
                i = int(rng.integers(n_keys))
                if rng.random() < 0.4:
                    cache.put(key(i), entries[i])
                else:
                    gets[t] += 1
                    got = cache.get(key(i))
                    if got is not None:
                        assert_same(got, entries[i])
                    len(cache), key(i) in cache, cache.stats()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    s = cache.stats()
    assert s.hits + s.misses == sum(gets)
    assert s.entries == len(cache) <= 15 and s.memory_bytes == s.entries * size <= cache.max_bytes
    assert s.encoder_seconds_saved == pytest.approx(0.5 * s.hits)
    assert s.corrupt_entries == 0 and s.store_errors == 0
    if with_dir:
        assert s.disk_hits > 0 and not list(tmp_path.rglob(".tmp-*"))


_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from semtoken_rag.fileformat import CacheEntry
    from semtoken_rag.keys import cache_key
    from semtoken_rag.diskstore import DirectoryStore
    from semtoken_rag.store import LayeredCache, MemoryStore
    directory, seed, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

    def make(i):
        rng = np.random.default_rng(i)
        return CacheEntry({"fingerprints": rng.standard_normal((64, 96)).astype(np.float16),
                           "offsets": rng.integers(0, 999, (64, 2)).astype(np.int32)}, encode_seconds=0.1)

    cache = LayeredCache(MemoryStore(0), DirectoryStore(directory))  # every get reads the file
    while not go.exists():
        time.sleep(0.005)
    bad = 0
    for step in range(400):
        i = (step * 7 + seed) % 24
        key = cache_key(f"shared chunk {i}", "ns")
        got = cache.get(key)
        if got is None or step % 3 == 0:
            cache.put(key, make(i))
        want = make(i)
        if got is not None and any(got[n].tobytes() != want[n].tobytes() for n in want.arrays):
            bad += 1
    s = cache.stats()
    print(json.dumps({"bad": bad, "corrupt": s.corrupt_entries, "hits": s.hits, "writes": s.disk_writes,
                      "errors": s.store_errors}))
    """
)


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    directory, go = tmp_path / "shared", tmp_path / "go"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(directory), str(seed), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (0, 5)
    ]
    time.sleep(0.3)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["bad"] == 0 and r["corrupt"] == 0 and r["errors"] == 0 and r["hits"] > 0 and r["writes"] > 0
    assert not list(directory.rglob(".tmp-*"))
    reader = make_cache(cache_dir=directory)
    files = list(directory.glob("*/*.stfp"))
    assert len(files) == 24
    for i in range(24):
        rng = np.random.default_rng(i)
        got = reader.get(cache_key(f"shared chunk {i}", "ns"))
        assert got is not None
        assert got["fingerprints"].tobytes() == rng.standard_normal((64, 96)).astype(np.float16).tobytes()
    assert reader.stats().corrupt_entries == 0


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_has_many_counts_only_entries_this_version_can_read(tmp_path: Path, kind: str) -> None:
    """Pre-warming skips what the store has: a file of an older format, of another key or garbage is not
    had, so a pre-warm rewrites it (it counted as stored, and replicas then missed every time)."""
    store = DirectoryStore(tmp_path)
    for i in range(3):
        store.put_many([(key(i), make_entry(i, n=30, d=32))])
    path = entry_path(tmp_path, key(0))
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes(), entry_path(tmp_path, key(2)).read_bytes()))
    older = entry_path(tmp_path, key(1))  # what format 1 left at the same path
    older.write_bytes(MAGIC + struct.pack("<HHHHd", 1, 64, 2, 0, 0.1) + b"x" * 200)
    damaged_after_header = kind in ("bitflip", "truncated")  # (its header intact: found when read)
    assert store.has_many([key(0), key(1), key(2), key(9)]) == [damaged_after_header, False, True, False]


def test_a_background_prune_is_not_paid_by_the_writing_call_and_runs_once_at_a_time(tmp_path: Path) -> None:
    """With prune_in_background (the engine's cache_dir), the call whose write crosses the bound returns
    before the scan; writes meanwhile start no second prune; once it ends, the bound holds."""
    probe = DirectoryStore(tmp_path / "probe", max_disk_bytes=None)
    probe.put(key(0), make_entry(0, n=20, d=32))
    file_size = next((tmp_path / "probe").glob("*/*.stfp")).stat().st_size
    bound = 5 * file_size
    store = DirectoryStore(tmp_path / "c", max_disk_bytes=bound, prune_in_background=True)
    for i in range(4):  # (the first write's scan, with nothing to delete, done in the background)
        store.put(key(i), make_entry(i, n=20, d=32))
        assert store.wait_for_prune(timeout=30)
        time.sleep(0.002)  # distinct mtimes
    gate, scans, real = threading.Event(), [], store._scan
    store._scan = lambda: (scans.append(1), gate.wait(30), real())[2]  # type: ignore[method-assign]
    for i in range(4, 12):  # over the bound from the 6th file on: every write would prune
        store.put(key(i), make_entry(i, n=20, d=32))
        time.sleep(0.002)
    assert store.wait_for_prune(timeout=0.05) is False  # the writes returned; the prune waits at its scan
    assert len(scans) == 1
    gate.set()
    assert store.wait_for_prune(timeout=30)
    assert store.disk_bytes() <= bound and store.get(key(11)) is not None and store.get(key(0)) is None
