"""The fingerprint cache as the engine uses it: warm equals cold, restarts, threads, processes, repeats."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from semtoken_rag import SemToken, SemTokenConfig

pytestmark = pytest.mark.slow  # the real encoder


def test_warm_equals_cold_and_skips_the_encoder(engine, nobel):
    engine.cache.clear()
    q = "who won two nobel prizes"
    cold = engine.compress(nobel, q, rate=0.3)
    # one encoder pass over the chunks: as many batches as the encoder's own pass over them takes
    # (sequences are batched by padded width, so chunks of different lengths may take two batches)
    one_pass = engine.encoder.fingerprint_with_stats(nobel)[1].batches
    assert cold.encoder_calls == one_pass >= 1 and cold.cache_hits == 0
    calls = engine.encoder.forward_calls
    warm = engine.compress(nobel, q, rate=0.3)
    assert warm.encoder_calls == 0 and warm.cache_hits == len(nobel)
    assert engine.encoder.forward_calls == calls  # not even the query: its embedding is cached too
    assert warm.texts == cold.texts
    assert [c.spans for c in warm.chunks] == [c.spans for c in cold.chunks]
    # a new query over the same chunks: only the query is encoded
    other = engine.compress(nobel, "where is the peace prize awarded", rate=0.3)
    assert other.cache_hits == len(nobel)
    stats = engine.cache_stats()
    assert stats.hits >= 2 * len(nobel) and stats.encoder_seconds_saved > 0


def test_restart_with_cache_dir_starts_warm(tmp_path, nobel):
    cfg = SemTokenConfig(cache_dir=tmp_path, device="cpu")
    first = SemToken(cfg)
    a = first.compress(nobel, "banana", rate=0.3)
    assert a.cache_hits == 0
    first.close()  # (as a process's exit does: the files are written on a worker thread, and close waits)
    files = list(tmp_path.rglob("*.stfp"))
    assert len(files) == len(nobel)
    second = SemToken(cfg)  # a new engine (as a new process would) on the same directory
    b = second.compress(nobel, "banana", rate=0.3)
    assert b.cache_hits == len(nobel) and b.encoder_calls == 0
    assert b.texts == a.texts


def test_corrupt_cache_files_are_rebuilt_not_trusted(tmp_path, nobel, caplog):
    cfg = SemTokenConfig(cache_dir=tmp_path, device="cpu")
    with SemToken(cfg) as first:
        want = first.compress(nobel, "physics", rate=0.3).texts
    files = sorted(tmp_path.rglob("*.stfp"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    files[1].write_bytes(b"\x00garbage" * 50)  # overwritten
    files[2].write_bytes(files[3].read_bytes())  # another chunk's file under this key
    fresh = SemToken(cfg)
    with caplog.at_level("WARNING"):
        res = fresh.compress(nobel, "physics", rate=0.3)
    fresh.close()
    assert res.texts == want
    assert res.cache_hits == len(nobel) - 3
    assert 1 <= res.encoder_calls <= fresh.encoder.fingerprint_with_stats(nobel)[1].batches
    assert sum("cache" in r.getMessage().lower() for r in caplog.records) == 1  # logged once
    again = SemToken(cfg).compress(nobel, "physics", rate=0.3)  # rebuilt files are good again
    assert again.cache_hits == len(nobel)


def test_memory_bound_evicts(nobel):
    eng = SemToken(SemTokenConfig(cache_max_bytes=100_000, device="cpu"))
    eng.compress(nobel, "q", rate=0.3)
    stats = eng.cache_stats()
    assert stats.memory_bytes <= 100_000 and stats.evictions > 0 and stats.entries < len(nobel)


def test_threads_hammering_one_engine(engine, nobel):
    engine.cache.clear()
    queries = ["nobel physics", "banana genus", "peace prize oslo", "matter and energy"]
    want = {q: engine.compress(nobel, q, rate=0.3).texts for q in queries}
    engine.cache.clear()
    errors, got = [], []

    def work(k):
        try:
            for j in range(6):
                q = queries[(k + j) % len(queries)]
                got.append((q, engine.compress(nobel[(k % 2):] if j % 3 == 2 else nobel, q, rate=0.3)))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for q, res in got:
        if len(res.chunks) == len(nobel):
            assert res.texts == want[q]


def test_two_processes_share_a_directory(tmp_path, nobel):
    script = textwrap.dedent(f"""
        import sys
        from semtoken_rag import SemToken, SemTokenConfig
        chunks = {nobel!r}
        eng = SemToken(SemTokenConfig(cache_dir={str(tmp_path)!r}, device="cpu"))
        for i in range(3):
            res = eng.compress(chunks[i % 2:] + chunks[:i % 2], "nobel prize", rate=0.3)
        print(res.cache_hits)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert not list(Path(tmp_path).rglob("*.tmp*")) and not list(Path(tmp_path).rglob("*.part"))
    third = SemToken(SemTokenConfig(cache_dir=tmp_path, device="cpu")).compress(nobel, "nobel prize", rate=0.3)
    assert third.cache_hits == len(nobel)


def test_cross_chunk_repeats_dropped_only_when_they_repeat(engine):
    shared = ("The Eiffel Tower was completed in 1889 as the entrance arch to the World's Fair in Paris, "
              "and it was the tallest structure in the world until 1930.")
    a = "Eiffel Tower\n" + shared + " It is made of wrought iron."
    b = "Paris landmarks\n" + shared + " Tourists visit it all year round."
    c = ("Statue of Liberty\nThe Statue of Liberty was dedicated in 1886 in New York Harbor, and it was a "
         "gift from the people of France to the United States.")
    res = engine.compress([a, b, c], "when was the eiffel tower completed", rate=0.9)
    kept_copies = sum(shared in ch.text for ch in res.chunks)
    assert kept_copies == 1
    repeats = [s for ch in res.chunks for s in ch.repeat_spans]
    assert len(repeats) >= 1
    # the Statue of Liberty sentence has the same shape but other content: never a repeat
    assert not res.chunks[2].repeat_spans
    off = SemToken(engine.config.model_copy(update={"dedup": False}))
    assert sum(shared in ch.text for ch in off.compress([a, b, c], "when was the eiffel tower completed",
                                                          rate=0.9).chunks) == 2


def test_conversation_memory_drops_what_was_already_sent(engine, nobel):
    q = "who won two nobel prizes"
    first = engine.compress(nobel, q, rate=0.5, conversation_id="conv-1")
    again = engine.compress(nobel, q, rate=0.5, conversation_id="conv-1")
    assert again.compressed_tokens < first.compressed_tokens
    assert sum(len(c.repeat_spans) for c in again.chunks) > 0
    other = engine.compress(nobel, q, rate=0.5, conversation_id="conv-2")
    assert other.texts == first.texts
    # conv-1's memory does not leak into conv-2: only repeats within the call itself, as in conv-1's first
    assert [c.repeat_spans for c in other.chunks] == [c.repeat_spans for c in first.chunks]
    assert sum(len(c.repeat_spans) for c in again.chunks) > sum(len(c.repeat_spans) for c in first.chunks)
