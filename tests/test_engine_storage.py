"""The engine's caches: entries checked against their chunk, disk bound, lost or read-only directories,
byte-bounded conversation and query memory, and the public cache API (clear, forget, typed stats)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import read_only_dir

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.diskstore import DirectoryStore
from semtoken_rag.fileformat import CacheEntry, encode_entry
from semtoken_rag.keys import cache_key
from semtoken_rag.store import CacheStats

Q = "who won two nobel prizes"


def entry_file(root: Path, engine: SemToken, chunk: str) -> Path:
    key = cache_key(chunk, engine.encoder.identity)
    return root / key[:2] / f"{key}.stfp"


def stored(root: Path, engine: SemToken, chunk: str) -> tuple[str, CacheEntry, Path]:
    from semtoken_rag.fileformat import decode_entry

    path = entry_file(root, engine, chunk)
    key = path.stem
    return key, decode_entry(path.read_bytes(), key), path


def _drop_units(e: CacheEntry, n: int) -> dict:
    return {"fingerprints": e["fingerprints"]}


def _shift_units(e: CacheEntry, n: int) -> dict:
    return {"fingerprints": e["fingerprints"], "units": (e["units"] + n).astype(np.int32)}


def _nan_vectors(e: CacheEntry, n: int) -> dict:
    fp = np.array(e["fingerprints"])
    fp[len(fp) // 2] = np.nan
    return {"fingerprints": fp, "units": e["units"]}


def _other_dim(e: CacheEntry, n: int) -> dict:
    return {"fingerprints": np.array(e["fingerprints"][:, :100]), "units": e["units"]}


def _reversed_units(e: CacheEntry, n: int) -> dict:
    return {"fingerprints": e["fingerprints"], "units": np.array(e["units"][::-1])}


def _float_units(e: CacheEntry, n: int) -> dict:
    return {"fingerprints": e["fingerprints"], "units": e["units"].astype(np.float32)}


BAD_ENTRIES = {"no units": _drop_units, "units past the chunk": _shift_units, "nan vectors": _nan_vectors,
               "other encoder dim": _other_dim, "units out of order": _reversed_units,
               "float units": _float_units}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_checksum_valid_but_wrong_entry_is_a_miss(tmp_path, nobel, case, caplog):
    cfg = SemTokenConfig(cache_dir=tmp_path, device="cpu")
    first = SemToken(cfg)
    want = first.compress(nobel, Q, rate=0.3)
    first.cache.flush()  # (the files are written on a worker thread: store_write_behind)
    key, entry, path = stored(tmp_path, first, nobel[0])
    path.write_bytes(encode_entry(key, CacheEntry(BAD_ENTRIES[case](entry, len(nobel[0])), 0.1)))
    second = SemToken(cfg)
    with caplog.at_level(logging.WARNING, logger="semtoken_rag"):
        got = second.compress(nobel, Q, rate=0.3)
        second.compress(nobel, Q, rate=0.3)  # now from memory: the rebuilt entry
    second.cache.flush()
    assert got.texts == want.texts
    assert [c.kept_spans for c in got.chunks] == [c.kept_spans for c in want.chunks]
    assert all(0 <= a < b <= len(t) for c, t in zip(got.chunks, nobel) for a, b in c.kept_spans)
    assert got.cache_hits == len(nobel) - 1 and got.encoder_calls == 1
    stats = second.cache_stats()
    assert stats.invalid_entries == 1 and stats.misses == 1
    assert sum("does not fit" in r.getMessage() for r in caplog.records) == 1
    third = SemToken(cfg).compress(nobel, Q, rate=0.3)  # the file was rewritten with a good entry
    assert third.cache_hits == len(nobel) and third.texts == want.texts


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_at_an_entry_path_does_not_hang_the_call(tmp_path, nobel):
    want = SemToken(SemTokenConfig(device="cpu")).compress(nobel, Q, rate=0.3)
    eng = SemToken(SemTokenConfig(cache_dir=tmp_path, device="cpu"))
    path = entry_file(tmp_path, eng, nobel[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(eng.compress(nobel, Q, rate=0.3)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the call hung on a FIFO"
    assert eng.cache.flush(timeout=120), "the write hung on a FIFO"
    assert got[0].texts == want.texts and got[0].cache_hits == 0
    assert eng.cache_stats().corrupt_entries == 1
    assert path.is_file()  # the write replaced the FIFO with a real entry


def test_disk_bound_is_passed_and_honoured(tmp_path, nobel):
    assert SemTokenConfig().cache_max_disk_bytes == 2**30
    default = SemToken(SemTokenConfig(cache_dir=tmp_path / "default", device="cpu"))
    assert isinstance(default.cache.backend, DirectoryStore)
    assert default.cache.backend.max_disk_bytes == 2**30
    unbounded = SemToken(SemTokenConfig(cache_dir=tmp_path / "free", cache_max_disk_bytes=None, device="cpu"))
    assert unbounded.cache.backend.max_disk_bytes is None
    unbounded.compress(nobel, Q, rate=0.3)
    unbounded.cache.flush()
    total = sum(f.stat().st_size for f in (tmp_path / "free").rglob("*.stfp"))
    bound = total - 1  # the four chunks do not fit together
    eng = SemToken(SemTokenConfig(cache_dir=tmp_path / "c", cache_max_disk_bytes=bound, device="cpu"))
    assert eng.cache.backend.max_disk_bytes == bound
    for chunk in nobel:  # one write per call, so the oldest file is the first chunk's
        eng.compress([chunk], Q, rate=0.3)
        eng.cache.flush()
        assert eng.cache.backend.wait_for_prune(timeout=30)  # (the engine prunes on a thread of its own)
    files = list((tmp_path / "c").rglob("*.stfp"))
    assert 0 < len(files) < len(nobel) and sum(f.stat().st_size for f in files) <= bound
    assert not entry_file(tmp_path / "c", eng, nobel[0]).exists()
    assert entry_file(tmp_path / "c", eng, nobel[-1]).exists()


def test_deleted_cache_dir_is_recreated(tmp_path, nobel):
    root = tmp_path / "cache"
    eng = SemToken(SemTokenConfig(cache_dir=root, device="cpu"))
    eng.compress(nobel[:2], Q, rate=0.3)
    eng.cache.flush()
    shutil.rmtree(root)
    eng.compress(nobel[2:], Q, rate=0.3)
    eng.cache.flush()
    assert sorted(root.rglob("*.stfp")) == sorted(entry_file(root, eng, c) for c in nobel[2:])
    later = SemToken(SemTokenConfig(cache_dir=root, device="cpu")).compress(nobel[2:], Q, rate=0.3)
    assert later.cache_hits == 2 and later.encoder_calls == 0


def test_read_only_cache_dir_is_still_read(tmp_path, nobel, caplog):
    root = tmp_path / "ro"
    with SemToken(SemTokenConfig(cache_dir=root, device="cpu")) as writer:  # (closing flushes its writes)
        want = writer.compress(nobel[:2], Q, rate=0.3)
    with read_only_dir(root):
        eng = SemToken(SemTokenConfig(cache_dir=root, device="cpu"))
        with caplog.at_level(logging.WARNING, logger="semtoken_rag"):
            got = eng.compress(nobel[:2], Q, rate=0.3)
            eng.compress(nobel[2:3], Q, rate=0.3)
            eng.compress(nobel[3:], Q, rate=0.3)
            eng.cache.flush()
        assert got.cache_hits == 2 and got.texts == want.texts
        assert eng.cache_stats().store_errors == 2
        assert len([r for r in caplog.records if r.name.startswith("semtoken_rag.")]) == 1


def test_cache_stats_clear_caches_and_forget_conversation(tmp_path, nobel):
    eng = SemToken(SemTokenConfig(cache_dir=tmp_path, device="cpu"))
    empty = eng.cache_stats()
    assert isinstance(empty, CacheStats) and empty == CacheStats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        empty.hits = 3  # type: ignore[misc]
    first = eng.compress(nobel, Q, rate=0.5, conversation_id="chat")
    eng.compress(nobel, "peace prize", rate=0.5, conversation_id="other")
    eng.cache.flush()
    s = eng.cache_stats()
    assert s.entries == len(nobel) and s.memory_bytes > 0 and s.disk_writes == len(nobel)
    assert s.queries == 2 and s.query_bytes > 0
    assert s.conversations == 2 and s.conversation_bytes > 0
    assert s.hits == len(nobel) and s.misses == len(nobel)

    again = eng.compress(nobel, Q, rate=0.5, conversation_id="chat")
    assert sum(len(c.repeat_spans) for c in again.chunks) > 0
    assert eng.forget_conversation("chat") is True and eng.forget_conversation("chat") is False
    assert eng.cache_stats().conversations == 1
    fresh = eng.compress(nobel, Q, rate=0.5, conversation_id="chat")
    assert fresh.texts == first.texts  # nothing remembered: nothing is a repeat

    eng.clear_caches()
    s = eng.cache_stats()
    assert (s.entries, s.memory_bytes, s.queries, s.query_bytes, s.conversations, s.conversation_bytes) \
        == (0, 0, 0, 0, 0, 0)
    assert s.hits > 0  # counters keep counting
    assert len(list(tmp_path.rglob("*.stfp"))) == len(nobel)  # disk entries untouched by default
    warm = eng.compress(nobel, Q, rate=0.5)
    assert warm.cache_hits == len(nobel) and eng.cache_stats().disk_hits == len(nobel)
    eng.clear_caches(disk=True)
    assert not list(tmp_path.rglob("*.stfp"))
    assert eng.compress(nobel, Q, rate=0.5).cache_hits == 0


def test_query_memo_is_bounded_in_bytes(nobel):
    queries = [f"question number {i} about nobel prizes and physics laureates" for i in range(8)]
    eng = SemToken(SemTokenConfig(query_memo_max_bytes=40_000, device="cpu"))
    for q in queries:
        eng.compress(nobel, q, rate=0.3)
        s = eng.cache_stats()
        assert s.query_bytes <= 40_000
    assert 1 <= s.queries < len(queries)
    off = SemToken(SemTokenConfig(query_memo_max_bytes=0, device="cpu"))
    res = off.compress(nobel, queries[0], rate=0.3)
    assert off.cache_stats().queries == 0 and off.cache_stats().query_bytes == 0
    assert res.texts == SemToken(SemTokenConfig(device="cpu")).compress(nobel, queries[0], rate=0.3).texts


def test_conversation_memory_is_bounded_in_bytes(nobel):
    bound = 20_000
    eng = SemToken(SemTokenConfig(conversation_max_bytes=bound, device="cpu"))
    for i in range(6):
        eng.compress(nobel, Q, rate=0.6, conversation_id=f"chat-{i}")
        s = eng.cache_stats()
        assert 0 < s.conversation_bytes <= bound
    assert 1 <= s.conversations < 6
    assert eng.memory.max_bytes == bound


def test_replicas_pruning_one_directory_together_keep_90_percent(tmp_path):
    """Two replicas that scan the shared directory at the same time and then prune: the files the first
    deleted count as freed for the second, so together they stop at 90% of the bound, not at nothing."""
    first = DirectoryStore(tmp_path / "shared", max_disk_bytes=None)
    first.put_many([(f"{i:064x}", CacheEntry({"v": np.full(2000, i, dtype=np.int32)})) for i in range(40)])
    files = sorted(first._scan())
    total = sum(size for _, size, _ in files)
    a = DirectoryStore(tmp_path / "shared", max_disk_bytes=total // 2)
    b = DirectoryStore(tmp_path / "shared", max_disk_bytes=total // 2)
    b._scan = lambda: list(files)  # (b scanned before a deleted anything, as a concurrent process does)
    assert a.prune() > 0
    b.prune()
    left = sum(size for _, size, _ in first._scan())
    biggest = max(size for _, size, _ in files)
    assert int(total // 2 * 0.9) - biggest <= left <= total // 2


def test_encoder_identity_follows_the_model_files_not_their_path(tiny_encoder, tmp_path):
    """Cache keys name the model by its files' contents: a copy elsewhere shares fingerprints, new
    weights of the same size in the same folder never reuse the old ones."""
    from safetensors.torch import load_file, save_file

    from semtoken_rag.encoder import Encoder

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_encoder, a)
    shutil.copytree(tiny_encoder, b)
    assert Encoder(str(a), device="cpu").identity == Encoder(str(b), device="cpu").identity
    chunks = ["The first Nobel Prize in Physics went to Röntgen.", "Bananas are berries."]
    store = tmp_path / "store"
    with SemToken(SemTokenConfig(encoder=str(a), device="cpu", store=str(store))) as first:
        first.compress(chunks, "nobel")
    other_path = SemToken(SemTokenConfig(encoder=str(b), device="cpu", store=str(store)))
    assert other_path.compress(chunks, "nobel").cache_hits == 2
    [weights] = b.glob("*.safetensors")
    size = weights.stat().st_size
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = tensors[name].flip(0).contiguous()  # fine-tuned, say: same shapes, same file size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    retrained = SemToken(SemTokenConfig(encoder=str(b), device="cpu", store=str(store)))
    assert retrained.encoder.identity != other_path.encoder.identity
    assert retrained.compress(chunks, "nobel").cache_hits == 0
