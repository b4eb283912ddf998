"""Tests for semtoken_rag.cache: real files, real threads, real processes, real FAISS."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from semtoken_rag import cache as cache_mod
from semtoken_rag.cache import (
    FORMAT_VERSION,
    MAGIC,
    CacheEntry,
    ConversationMemory,
    FingerprintCache,
    cache_key,
    find_repeats,
)

LOGGER = "semtoken_rag.cache"


def make_entry(seed: int, n: int = 150, d: int = 384, seconds: float = 0.25) -> CacheEntry:
    rng = np.random.default_rng(seed)
    fp = rng.standard_normal((n, d)).astype(np.float16)
    offsets = np.cumsum(rng.integers(1, 8, size=(n, 2)), axis=0).astype(np.int32)
    return CacheEntry({"fingerprints": fp, "offsets": offsets}, encode_seconds=seconds)


def assert_same(a: CacheEntry | None, b: CacheEntry) -> None:
    assert a is not None
    assert list(a.arrays) == list(b.arrays)
    for name in b.arrays:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].tobytes() == b[name].tobytes()
    assert a.encode_seconds == b.encode_seconds


def key(i: int) -> str:
    return cache_key(f"chunk number {i}", "test-encoder|v1")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- keys and entries


def test_cache_key_is_strong_and_separates_namespace() -> None:
    k = cache_key("hello", "enc")
    assert len(k) == 64 and int(k, 16) >= 0
    assert k == cache_key("hello", "enc")
    assert k != cache_key("hello", "enc2") != cache_key("hello!", "enc")
    assert cache_key("bc", "a") != cache_key("c", "ab")  # no ambiguity at the boundary
    odd = cache_key("lone \ud800 surrogate \x00 and emoji \U0001f600", "ns \udfff")
    assert len(odd) == 64
    with pytest.raises(TypeError, match="str"):
        cache_key(b"bytes", "ns")  # type: ignore[arg-type]


def test_entry_validation_and_immutability() -> None:
    fp = np.ones((2, 3), np.float16)
    entry = CacheEntry({"fingerprints": fp}, encode_seconds=1)
    fp[0, 0] = 7  # the caller's array is copied
    assert entry["fingerprints"][0, 0] == 1
    assert not entry["fingerprints"].flags.writeable
    assert "fingerprints" in entry and entry.encode_seconds == 1.0
    with pytest.raises(TypeError, match="float16"):
        CacheEntry({"fingerprints": np.ones((2, 3), np.float32)})
    with pytest.raises(TypeError, match="dtype object"):
        CacheEntry({"x": np.array([None])})
    with pytest.raises(TypeError, match="numpy array"):
        CacheEntry({"x": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="encode_seconds"):
        CacheEntry({}, encode_seconds=-1)
    cache = FingerprintCache()
    with pytest.raises(ValueError, match="cache keys"):
        cache.put("../../etc/passwd", entry)
    with pytest.raises(TypeError, match="CacheEntry"):
        cache.put(key(0), {"fingerprints": fp})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        FingerprintCache(max_bytes=-1)


# ----------------------------------------------------------------------------- memory tier


def test_round_trip_is_bit_identical_and_counts() -> None:
    cache = FingerprintCache()
    entry = make_entry(1)
    assert cache.get(key(1)) is None
    cache.put(key(1), entry)
    assert_same(cache.get(key(1)), entry)
    assert key(1) in cache and key(2) not in cache and len(cache) == 1
    s = cache.stats()
    assert (s.hits, s.misses, s.disk_hits, s.entries) == (1, 1, 0, 1)
    assert s.memory_bytes == entry.nbytes and s.encoder_seconds_saved == 0.25


def test_lru_eviction_at_byte_bound() -> None:
    entries = {i: make_entry(i, n=20, d=16) for i in range(4)}
    size = entries[0].nbytes
    cache = FingerprintCache(max_bytes=3 * size)
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
    mem_only = FingerprintCache(max_bytes=0)
    mem_only.put(key(5), big)
    assert mem_only.get(key(5)) is None and len(mem_only) == 0
    small_mem = FingerprintCache(max_bytes=1000, cache_dir=tmp_path)
    small_mem.put(key(5), big)  # too big for memory, still persisted
    assert len(small_mem) == 0
    assert_same(small_mem.get(key(5)), big)
    assert small_mem.stats().disk_hits == 1 and len(small_mem) == 0


# ----------------------------------------------------------------------------- disk tier


def test_restart_starts_warm(tmp_path: Path) -> None:
    first = FingerprintCache(cache_dir=tmp_path / "c")
    entries = {i: make_entry(i) for i in range(3)}
    for i, e in entries.items():
        first.put(key(i), e)
    files = sorted((tmp_path / "c").glob("*/*.stfp"))
    assert len(files) == 3 and all(f.parent.name == f.name[:2] for f in files)
    second = FingerprintCache(cache_dir=tmp_path / "c")
    assert len(second) == 0
    for i, e in entries.items():
        assert_same(second.get(key(i)), e)
    assert_same(second.get(key(0)), entries[0])  # now served from memory
    s = second.stats()
    assert (s.hits, s.disk_hits, s.misses, s.entries) == (4, 3, 0, 3)
    assert s.encoder_seconds_saved == pytest.approx(1.0)
    assert not list((tmp_path / "c").rglob(".tmp-*"))
    second.clear()
    assert len(second) == 0 and not list((tmp_path / "c").glob("*/*.stfp"))


def _version_bump(data: bytes, other: bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into("<H", out, len(MAGIC), FORMAT_VERSION + 1)
    out[-16:] = hashlib.blake2b(bytes(out[:-16]), digest_size=16).digest()  # valid checksum, wrong version
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
    writer = FingerprintCache(cache_dir=tmp_path)
    entries = {i: make_entry(i, n=30, d=32) for i in range(3)}
    for i, e in entries.items():
        writer.put(key(i), e)
    path = {i: tmp_path / key(i)[:2] / f"{key(i)}.stfp" for i in entries}
    other = path[2].read_bytes()
    for i in (0, 1):
        path[i].write_bytes(CORRUPTIONS[kind](path[i].read_bytes(), other))

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reader = FingerprintCache(cache_dir=tmp_path)
    assert reader.get(key(0)) is None
    assert key(1) not in reader
    assert reader.get(key(1)) is None
    assert_same(reader.get(key(2)), entries[2])
    assert len(warnings_of(caplog)) == 1  # once per instance, then DEBUG
    assert "rebuilt" in warnings_of(caplog)[0].getMessage()
    s = reader.stats()
    assert s.misses == 2 and s.corrupt_files >= 2 and s.hits == 1
    assert not path[0].exists()  # the bad file was removed

    reader.put(key(0), entries[0])  # the caller recomputes: the file is rewritten
    assert_same(FingerprintCache(cache_dir=tmp_path).get(key(0)), entries[0])


def test_unusable_directory_falls_back_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cache = FingerprintCache(cache_dir=blocker / "cache")
    assert cache.cache_dir is None
    assert len(warnings_of(caplog)) == 1 and "memory only" in warnings_of(caplog)[0].getMessage()
    cache.put(key(1), make_entry(1))
    assert_same(cache.get(key(1)), make_entry(1))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_falls_back_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        caplog.set_level(logging.WARNING, logger=LOGGER)
        cache = FingerprintCache(cache_dir=ro)
        assert cache.cache_dir is None and len(warnings_of(caplog)) == 1
    finally:
        ro.chmod(0o700)


def test_failed_write_warns_once_and_leaves_no_temp_files(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cache = FingerprintCache(cache_dir=tmp_path)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    for i in range(2):  # the shard directory is taken by a file: writing must fail
        (tmp_path / key(i)[:2]).write_text("in the way")
        cache.put(key(i), make_entry(i, n=4, d=8))
        assert_same(cache.get(key(i)), make_entry(i, n=4, d=8))
    assert len(warnings_of(caplog)) == 1
    assert not list(tmp_path.rglob(".tmp-*"))


def test_disk_bound_prunes_oldest(tmp_path: Path) -> None:
    probe = FingerprintCache(cache_dir=tmp_path / "probe")
    probe.put(key(0), make_entry(0, n=20, d=32))
    file_size = next((tmp_path / "probe").glob("*/*.stfp")).stat().st_size
    bound = 5 * file_size
    cache = FingerprintCache(max_bytes=0, cache_dir=tmp_path / "c", max_disk_bytes=bound)
    for i in range(20):
        cache.put(key(i), make_entry(i, n=20, d=32))
        time.sleep(0.002)  # distinct mtimes
    files = list((tmp_path / "c").glob("*/*.stfp"))
    assert 0 < len(files) <= 5 and sum(f.stat().st_size for f in files) <= bound
    assert_same(cache.get(key(19)), make_entry(19, n=20, d=32))  # the newest survives
    assert cache.get(key(0)) is None


def test_bytes_per_cached_chunk(tmp_path: Path) -> None:
    entry = make_entry(0, n=150, d=384)
    payload = 150 * 384 * 2 + 150 * 2 * 4
    assert payload <= entry.nbytes <= payload + 1024
    cache = FingerprintCache(cache_dir=tmp_path)
    cache.put(key(0), entry)
    size = next(tmp_path.glob("*/*.stfp")).stat().st_size
    assert payload < size <= payload + 256


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("with_dir", [False, True], ids=["memory", "disk"])
def test_threads_hammering_one_cache(tmp_path: Path, with_dir: bool) -> None:
    n_keys, n_threads, n_ops = 40, 8, 500
    entries = {i: make_entry(i, n=8, d=16, seconds=0.5) for i in range(n_keys)}
    size = entries[0].nbytes
    cache = FingerprintCache(max_bytes=15 * size, cache_dir=tmp_path if with_dir else None, fsync=False)
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
    assert s.corrupt_files == 0
    if with_dir:
        assert s.disk_hits > 0 and not list(tmp_path.rglob(".tmp-*"))


_WORKER = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    from pathlib import Path
    import numpy as np
    spec = importlib.util.spec_from_file_location("st_cache_worker", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    directory, seed, go = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])

    def make(i):
        rng = np.random.default_rng(i)
        return mod.CacheEntry({"fingerprints": rng.standard_normal((64, 96)).astype(np.float16),
                               "offsets": rng.integers(0, 999, (64, 2)).astype(np.int32)}, encode_seconds=0.1)

    cache = mod.FingerprintCache(max_bytes=0, cache_dir=directory)  # every get reads the file
    while not go.exists():
        time.sleep(0.005)
    bad = 0
    for step in range(400):
        i = (step * 7 + seed) % 24
        key = mod.cache_key(f"shared chunk {i}", "ns")
        got = cache.get(key)
        if got is None or step % 3 == 0:
            cache.put(key, make(i))
        want = make(i)
        if got is not None and any(got[n].tobytes() != want[n].tobytes() for n in want.arrays):
            bad += 1
    s = cache.stats()
    print(json.dumps({"bad": bad, "corrupt": s.corrupt_files, "hits": s.hits, "writes": s.disk_writes}))
    """
)


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    directory, go = tmp_path / "shared", tmp_path / "go"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), cache_mod.__file__, str(directory), str(seed), str(go)],
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
        assert r["bad"] == 0 and r["corrupt"] == 0 and r["hits"] > 0 and r["writes"] > 0
    assert not list(directory.rglob(".tmp-*"))
    reader = FingerprintCache(cache_dir=directory)
    files = list(directory.glob("*/*.stfp"))
    assert len(files) == 24
    for i in range(24):
        rng = np.random.default_rng(i)
        got = reader.get(cache_key(f"shared chunk {i}", "ns"))
        assert got is not None
        assert got["fingerprints"].tobytes() == rng.standard_normal((64, 96)).astype(np.float16).tobytes()
    assert reader.stats().corrupt_files == 0


# ----------------------------------------------------------------------------- FAISS repeats


def unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def angles(*deg: float) -> np.ndarray:
    r = np.radians(deg)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_find_repeats_basic_rules() -> None:
    x = unit([1, 0, 0], [0, 1, 0], [1, 0, 0])
    order = np.arange(3)
    assert find_repeats(x, np.array([0, 0, 1]), order, 0.95).tolist() == [-1, -1, 0]
    assert find_repeats(x, np.array([0, 0, 0]), order, 0.95).tolist() == [-1, -1, -1]  # same chunk
    # priority: span 2 is best, so span 0 is the repeat
    assert find_repeats(x, np.array([0, 0, 1]), np.array([2, 0, 1]), 0.95).tolist() == [2, -1, -1]


def test_find_repeats_threshold() -> None:
    x = angles(0, 30)  # cos = 0.866
    g, o = np.array([0, 1]), np.arange(2)
    assert find_repeats(x, g, o, 0.9).tolist() == [-1, -1]
    assert find_repeats(x, g, o, 0.85).tolist() == [-1, 0]


def test_find_repeats_chains_and_best_original() -> None:
    # 0 -- 1 (cos .966) -- 2 (cos .966), 0 -- 2 cos .866: 1 repeats 0, so 2 has no valid original
    x = angles(0, 15, 30)
    assert find_repeats(x, np.array([0, 1, 2]), np.arange(3), 0.95).tolist() == [-1, 0, -1]
    # span 3 is close to both 0 and 1 (different chunks): the more similar one is chosen
    x = angles(0, 50, 200, 45)
    assert find_repeats(x, np.array([0, 1, 2, 3]), np.arange(4), 0.9).tolist() == [-1, -1, -1, 1]


def test_find_repeats_eligibility() -> None:
    x = unit([1, 0], [1, 0], [1, 0])
    g = np.array([0, 1, 2])
    assert find_repeats(x, g, np.arange(3), 0.9, np.array([False, True, True])).tolist() == [-1, -1, 1]
    assert find_repeats(x, g, np.arange(3), 0.9, np.array([True, False, False])).tolist() == [-1, -1, -1]


def test_find_repeats_validation_and_edges() -> None:
    empty = find_repeats(np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, int), 0.9)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="permutation"):
        find_repeats(unit([1, 0], [0, 1]), np.array([0, 1]), np.array([0, 0]), 0.9)
    with pytest.raises(ValueError, match="groups must have shape"):
        find_repeats(unit([1, 0], [0, 1]), np.array([0, 1, 2]), np.array([0, 1]), 0.9)
    with pytest.raises(ValueError, match="2-D"):
        find_repeats(np.ones(3, np.float32), np.zeros(3, int), np.arange(3), 0.9)


def _reference_repeats(x: np.ndarray, groups: np.ndarray, order: np.ndarray, thr: float) -> list[int]:
    sims = x @ x.T
    out = [-1] * len(x)
    for pos, i in enumerate(order):
        cands = [j for j in order[:pos] if groups[j] != groups[i] and out[j] == -1 and sims[i, j] >= thr]
        if cands:
            out[i] = max(cands, key=lambda j: (sims[i, j], -list(order).index(j)))
    return out


def test_find_repeats_matches_brute_force() -> None:
    rng = np.random.default_rng(42)
    centers = rng.standard_normal((15, 24))
    x = centers[rng.integers(0, 15, 300)] + 0.15 * rng.standard_normal((300, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    groups, order = rng.integers(0, 12, 300), rng.permutation(300)
    got = find_repeats(x, groups, order, 0.97, use_gpu=False)
    assert (got >= 0).sum() > 20
    assert got.tolist() == _reference_repeats(x.astype(np.float64), groups, order, 0.97)
    # use_gpu=True falls back to the CPU index cleanly when faiss has no GPU support
    assert find_repeats(x, groups, order, 0.97, use_gpu=True).tolist() == got.tolist()


# ----------------------------------------------------------------------------- conversation memory


def test_conversation_memory_per_key() -> None:
    mem = ConversationMemory()
    seen = unit([1, 0, 0], [0, 1, 0])
    mem.add("alice", seen)
    probe = unit([1, 0, 0], [0, 0, 1], [0, 0.999, 0.04])
    assert mem.query("alice", probe, 0.95).tolist() == [True, False, True]
    assert mem.query("bob", probe, 0.95).tolist() == [False, False, False]
    assert "alice" in mem and "bob" not in mem and len(mem) == 1 and mem.spans("alice") == 2
    with pytest.raises(ValueError, match="dimension"):
        mem.add("alice", unit([1, 0]))
    mem.forget("alice")
    assert mem.query("alice", probe, 0.95).tolist() == [False, False, False]


def test_conversation_memory_bounds() -> None:
    mem = ConversationMemory(max_conversations=2, max_spans=3)
    eye = np.eye(8, dtype=np.float32)
    mem.add("a", eye[:1])
    mem.add("b", eye[:1])
    mem.query("a", eye[:1], 0.9)  # touch a: b is now the oldest
    mem.add("c", eye[:1])
    assert "b" not in mem and "a" in mem and "c" in mem and len(mem) == 2
    for i in range(5):
        mem.add("c", eye[i : i + 1])
    assert mem.spans("c") == 3
    assert mem.query("c", eye[:5], 0.9).tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match="max_spans"):
        ConversationMemory(max_spans=0)
