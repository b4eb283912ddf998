"""semtoken-rag prewarm: corpus reading, in-process and Ray Data pre-warming into a real Redis, resuming."""

from __future__ import annotations

import gzip
import json
from importlib.resources import files

import pytest

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.cli import main
from semtoken_rag.prewarm import prewarm_corpus, read_texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    lines = (files("semtoken_rag") / "data" / "sample_nq.jsonl").read_text(encoding="utf-8").splitlines()
    out = [p["text"] for line in lines[:2] for p in json.loads(line)["passages"]]
    return list(dict.fromkeys(out))[:24]


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_read_texts_formats_and_errors(tmp_path, texts):
    assert list(read_texts(_jsonl(tmp_path / "c.jsonl", texts))) == texts
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gz chunk"}) + "\n")
    assert list(read_texts(tmp_path / "c.jsonl.gz", "body")) == ["gz chunk"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": texts[:5], "n": list(range(5))}), tmp_path / "c.parquet")
    assert list(read_texts(tmp_path / "c.parquet")) == texts[:5]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(read_texts(tmp_path / "c.parquet", "body"))
    with pytest.raises(ValueError, match=r"c\.jsonl:1: no field 'body'"):
        list(read_texts(tmp_path / "c.jsonl", "body"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n[1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'text' must be a string, got int"):
        list(read_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: not JSON"):
        list(read_texts(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="expected .jsonl"):
        list(read_texts(_jsonl(tmp_path / "c.csv", texts)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_texts(tmp_path / "missing.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not UTF-8 text \(invalid continuation byte\)"):
        list(read_texts(tmp_path / "latin1.jsonl"))
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:60])  # EOFError, not an OSError
    damaged = bytearray(whole)
    damaged[20:40] = bytes(20)  # zlib.error
    (tmp_path / "damaged.jsonl.gz").write_bytes(bytes(damaged))
    for name in ("cut.jsonl.gz", "damaged.jsonl.gz"):
        with pytest.raises(ValueError, match=rf"{name.replace('.', r'[.]')}: not a readable gzip file"):
            list(read_texts(tmp_path / name))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
        list(read_texts(tmp_path / "bad.parquet"))


def test_in_process_prewarm_resumes_and_serves_hits(tmp_path, redis_url, texts):
    config = SemTokenConfig(device="cpu", store=redis_url)
    half = prewarm_corpus(_jsonl(tmp_path / "half.jsonl", texts[:10]), config, batch_size=4)
    assert (half.passages, half.encoded, half.ray) == (10, 10, False)
    full = prewarm_corpus(_jsonl(tmp_path / "all.jsonl", texts + texts[:3]), config)  # a stopped run resumed
    assert (full.passages, full.encoded, full.skipped) == (len(texts) + 3, len(texts) - 10, 13)
    replica = SemToken(config)  # a fresh engine: empty memory, same Redis
    res = replica.compress(texts[10:20], "who won the super bowl", rate=0.3)
    assert res.encoder_calls == 0 and res.cache_hits == 10


def test_prewarm_adds_the_analysis_to_redis_entries_that_lack_it(tmp_path, redis_url, texts, capsys):
    """Entries pre-warmed into Redis without analyses (an older version, --no-analyses) get them on the next
    pre-warm, found by reading each value's first bytes (GETRANGE), without encoding; a replica then adopts
    them."""
    corpus = _jsonl(tmp_path / "c.jsonl", texts)
    bare = prewarm_corpus(corpus, SemTokenConfig(device="cpu", store=redis_url, prewarm_analyses=False))
    assert (bare.encoded, bare.analysed) == (len(texts), 0)
    assert main(["prewarm", str(corpus), "--store", redis_url, "--quiet", "--device", "cpu"]) == 0
    assert f"0 encoded, {len(texts)} already stored or blank ({len(texts)} of them given their analysis)" in \
        capsys.readouterr().out
    config = SemTokenConfig(device="cpu", store=redis_url)
    again = prewarm_corpus(corpus, config)
    assert (again.encoded, again.analysed) == (0, 0)
    replica = SemToken(config)
    want = SemToken(SemTokenConfig(device="cpu")).compress(texts[:10], "who won the super bowl", rate=0.3)
    got = replica.compress(texts[:10], "who won the super bowl", rate=0.3)
    assert got.cache_hits == 10 and replica.analyses.misses == 0
    assert [c.kept_spans for c in got.chunks] == [c.kept_spans for c in want.chunks]


def test_ray_prewarm_on_a_local_cluster(tmp_path, redis_url, ray_cluster, texts):
    config = SemTokenConfig(device="cpu", store=redis_url)
    corpus = _jsonl(tmp_path / "c.jsonl", texts)
    seen: list[int] = []
    report = prewarm_corpus(corpus, config, use_ray=True, actors=2, batch_size=8, progress=seen.append)
    assert (report.passages, report.encoded, report.ray, report.analysed) == (len(texts), len(texts), True, 0)
    assert sum(seen) == len(texts)
    res = SemToken(config).compress(texts[:20], "who got the first nobel prize in physics", rate=0.3)
    assert res.encoder_calls == 0 and res.cache_hits == 20
    again = prewarm_corpus(corpus, config, use_ray=True, actors=1)  # resume: nothing left to encode
    assert (again.passages, again.encoded) == (len(texts), 0)
    nulls = tmp_path / "nulls.jsonl"  # (Ray reads a null or missing field as None: never the text "None")
    nulls.write_text('{"text": "a chunk"}\n{"text": null}\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nulls\.jsonl: field 'text' must be a string, got null or missing") as e:
        prewarm_corpus(nulls, config, use_ray=True, actors=1)
    assert "Traceback" not in str(e.value)


def test_ray_needs_a_shared_store(tmp_path, texts):
    with pytest.raises(ValueError, match="shared store"):
        prewarm_corpus(_jsonl(tmp_path / "c.jsonl", texts), SemTokenConfig(), use_ray=True)


def test_cli_prewarm(tmp_path, redis_url, texts, capsys):
    corpus = _jsonl(tmp_path / "c.jsonl", texts[:6], field="body")
    assert main(["prewarm", str(corpus), "--store", redis_url, "--text-field", "body", "--json", "--quiet",
                 "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["passages"], report["encoded"], report["skipped"]) == (6, 6, 0)
    assert main(["prewarm", str(corpus), "--store", redis_url, "--text-field", "body", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "pre-warmed 6 passages" in captured.out and "0 encoded" in captured.out
    assert main(["prewarm", str(tmp_path / "nope.jsonl"), "--store", redis_url, "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prewarm", str(corpus), "--store", redis_url, "--quiet", "--device", "cpu"]) == 2
    assert "no field 'text'" in capsys.readouterr().err
    assert main(["prewarm", str(corpus), "--store", "http://x", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and err.count("\n") == 1  # one line
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert main(["prewarm", str(tmp_path / "latin1.jsonl"), "--store", redis_url, "--quiet"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a chunk"}\n' * 50)[:40])
    assert main(["prewarm", str(tmp_path / "cut.jsonl.gz"), "--store", redis_url, "--quiet"]) == 2  # (was 1,
    err = capsys.readouterr().err  # a traceback: exit 1 is the status of a store fault)
    assert "not a readable gzip file" in err and err.count("\n") == 1
    plain = _jsonl(tmp_path / "plain.jsonl", texts[:2])
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory", encoding="utf-8")
    # the store cannot be written (a file where its directory belongs; Redis refusing connections):
    # the run fails, though each chunk was encoded
    for store in (str(a_file), "redis://127.0.0.1:1/0"):
        assert main(["prewarm", str(plain), "--store", store, "--quiet", "--device", "cpu", "--json"]) == 1
        captured = capsys.readouterr()
        assert json.loads(captured.out)["store_errors"] > 0
        assert "fault(s) of the store" in captured.err and "fingerprints may be missing" in captured.err
    # without --json a failed run prints no success line: its counts go into the error line
    assert main(["prewarm", str(plain), "--store", str(a_file), "--quiet", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "pre-warmed" not in captured.out and "(read 2 passages into" in captured.err
    with pytest.raises(SystemExit):
        main(["prewarm", str(corpus)])  # --store is required


def test_cli_prewarm_for_replicas_with_a_pinned_precision(tmp_path, texts, capsys):
    """Store keys depend on the encoder and its precision: --dtype pre-warms for replicas that pin one."""
    corpus, store = _jsonl(tmp_path / "c.jsonl", texts[:3]), str(tmp_path / "store")
    assert main(["prewarm", str(corpus), "--store", store, "--quiet", "--device", "cpu", "--dtype", "float32"]) == 0
    for dtype, hits in (("float32", 3), ("bfloat16", 0)):
        engine = SemToken(SemTokenConfig(device="cpu", store=store, dtype=dtype))
        assert engine.compress(texts[:3], "a question", rate=0.5).cache_hits == hits
    capsys.readouterr()
    assert main(["prewarm", str(corpus), "--store", store, "--quiet", "--encoder", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "cannot pre-warm" in err and "never downloads weights" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["prewarm", str(corpus), "--store", store, "--dtype", "float8"])


def test_a_directory_store_too_small_for_the_corpus_fails_the_run(tmp_path, texts, capsys):
    """A directory store's bound (cache_max_disk_bytes, 1 GiB by default: about 11,000 NQ entries) deleted
    the pre-warm's own entries and the run said it succeeded: it now says how many, and fails."""
    corpus = _jsonl(tmp_path / "c.jsonl", texts)
    small = prewarm_corpus(corpus, SemTokenConfig(device="cpu", store=str(tmp_path / "s"),
                                                  cache_max_disk_bytes=300_000), batch_size=4)
    assert small.encoded == len(texts) and small.pruned > 0
    args = ["prewarm", str(corpus), "--quiet", "--device", "cpu", "--store"]
    assert main([*args, str(tmp_path / "s2"), "--max-disk-gib", "0.0003"]) == 1
    err = capsys.readouterr().err
    assert "deleted" in err and "--max-disk-gib" in err
    assert main([*args, str(tmp_path / "s3"), "--max-disk-gib", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["encoded"], report["pruned"], report["missing"]) == (len(texts), 0, None)
    # older entries pruned to make room for a corpus that fits: a warning, not a failed run
    other = _jsonl(tmp_path / "other.jsonl", [t + " (another corpus)" for t in texts[:8]])
    assert main([*args, str(tmp_path / "s4"), "--max-disk-gib", "0.0004", "--json"]) == 1  # (too small)
    capsys.readouterr()
    first = prewarm_corpus(other, SemTokenConfig(device="cpu", store=str(tmp_path / "s5")))
    assert first.pruned == 0
    half = _jsonl(tmp_path / "half.jsonl", texts[:6])
    size = sum(f.stat().st_size for f in (tmp_path / "s5").rglob("*") if f.is_file())
    assert main(["prewarm", str(half), "--quiet", "--device", "cpu", "--store", str(tmp_path / "s5"),
                 "--max-disk-gib", str(1.4 * size / 2**30)]) == 0
    captured = capsys.readouterr()
    assert "older entries" in captured.err and "pre-warmed 6 passages" in captured.out


def test_prewarm_options_that_do_not_apply_and_a_byte_order_mark(tmp_path, redis_url, texts, capsys):
    corpus = _jsonl(tmp_path / "c.jsonl", texts[:2])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + corpus.read_bytes())
    assert list(read_texts(bom)) == texts[:2]
    base = ["prewarm", str(corpus), "--quiet", "--device", "cpu", "--store"]
    for extra, store, message in ((["--actors", "2"], str(tmp_path / "d"), "--actors needs --ray"),
                                  (["--store-ttl", "60"], str(tmp_path / "d"), "--store-ttl needs a Redis store"),
                                  (["--max-disk-gib", "2"], redis_url, "--max-disk-gib bounds a directory")):
        assert main([*base, store, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main([*base, str(tmp_path / "tiny"), "--max-disk-gib", "1e-10"]) == 1  # (a bound of 1 byte, not none)
    assert "2 of the corpus's chunks are not in it" in capsys.readouterr().err
