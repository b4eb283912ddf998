"""The Redis round trip of one call's chunks, this checkout's storage code beside another revision's.

    python -m benchmarks.redis_roundtrip                   # this checkout vs main, NQ 150-159, 40 rounds
    python -m benchmarks.redis_roundtrip --baseline HEAD~3 --n 10 --rounds 60

Encodes the 20 retrieved passages of NQ questions 150-(150+n-1) once with the real engine, stores the
entries (float16 fingerprints, int32 units, as the engine writes them) through both revisions'
``RedisStore`` into one throwaway ``redis-server`` (the format version is in the key prefix, so both
live side by side) and then times, alternating between the revisions call by call:

* ``round trip``: ``RedisStore.get_many`` for one call's keys (pipelined ``MGET`` + decoding), the
  figure ``benchmarks.scale`` reports;
* ``lookup``: what a replica's first call pays for it in the cache (``LayeredCache.get_many`` with
  the engine's check of every entry against its chunk, nothing kept in memory);
* ``MGET only``: the client's ``mget`` on the same names (the socket and the client's parser).

redis-py parses replies with ``hiredis`` (C) when it is installed (the ``redis`` extra brings it), else
in Python; with ``hiredis`` importable, this checkout is also timed with the Python parser forced.

The other revision's ``semtoken_rag`` is extracted with ``git archive`` into a temporary package, so
both run in one process on the same machine state. Medians (and p95) over every call of every round.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .data import load_nq, main_guard

ROOT = Path(__file__).resolve().parent.parent


def _import_revision(rev: str, where: Path) -> str:
    """Import ``semtoken_rag`` as of ``rev`` under another name; return that name."""
    name = "semtoken_rag_baseline"
    tar = subprocess.run(["git", "archive", "--format=tar", rev, "semtoken_rag"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(where, filter="data")
    (where / "semtoken_rag").rename(where / name)
    sys.path.insert(0, str(where))
    importlib.import_module(name)
    return name


def _ms(xs: list[float]) -> dict:
    s = sorted(xs)
    return {"median": round(1000 * statistics.median(s), 3), "p95": round(1000 * s[int(0.95 * (len(s) - 1))], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.redis_roundtrip", description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="main", help="git revision to compare with (default: main)")
    p.add_argument("--n", type=int, default=10, help="questions from 150 on (default 10: 200 passages)")
    p.add_argument("--rounds", type=int, default=40, help="passes over the n calls (default 40)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)

    import numpy as np

    from semtoken_rag import SemToken, SemTokenConfig
    from semtoken_rag.keys import cache_key
    from semtoken_rag.testing import LocalRedis

    records = load_nq(args.n, data_dir=args.data_dir, start=150)
    calls = [list(r.chunks) for r in records]
    texts = list(dict.fromkeys(c for chunks in calls for c in chunks))
    engine = SemToken(SemTokenConfig(device="cpu"))
    t0 = time.perf_counter()
    fps = dict(zip(texts, engine.encoder.fingerprint(texts)))
    print(f"[roundtrip] encoded {len(texts)} passages in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ns, dim = engine.encoder.identity, engine.encoder.dim

    with tempfile.TemporaryDirectory() as tmp, LocalRedis() as server:
        packages = {"baseline": _import_revision(args.baseline, Path(tmp)), "this": "semtoken_rag"}
        impls = {}
        for label, pkg in packages.items():
            ff = importlib.import_module(f"{pkg}.fileformat")
            rs = importlib.import_module(f"{pkg}.redis_store")
            st = importlib.import_module(f"{pkg}.store")
            store = rs.RedisStore(server.url, namespace=ns)
            store.put_many([(cache_key(t, ns), ff.CacheEntry({"fingerprints": fp.vectors.numpy(),
                                                              "units": fp.units.astype(np.int32)}, 0.1))
                            for t, fp in fps.items()])
            cache = st.LayeredCache(st.MemoryStore(0), store)  # memory keeps nothing: every lookup asks Redis
            impls[label] = (ff, store, cache)
        from redis.utils import HIREDIS_AVAILABLE

        if HIREDIS_AVAILABLE:  # the same store (same keys) through the pure-Python RESP3 parser
            import redis
            from redis._parsers import _RESP3Parser

            ff, store, _ = impls["this"]
            py = rs.RedisStore(server.url, namespace=ns, client=redis.Redis.from_url(
                server.url, parser_class=_RESP3Parser, protocol=3))
            impls["this, Python parser"] = (ff, py, st.LayeredCache(st.MemoryStore(0), py))
        keys = [[cache_key(c, ns) for c in chunks] for chunks in calls]
        sizes = {label: statistics.mean(sum(map(len, store.client.mget([store.prefix + k for k in ks])))
                                        for ks in keys) for label, (_, store, _) in impls.items()}

        def lookup(label: str, i: int) -> list:
            ff, _, cache = impls[label]
            chunks = calls[i]
            return cache.get_many(keys[i], valid=lambda j, e: ff.validate_fingerprints(
                e.get("units"), e.get("fingerprints"), len(chunks[j]), dim))

        timed = {
            "round_trip": lambda label, i: impls[label][1].get_many(keys[i]),
            "lookup": lookup,
            "mget_only": lambda label, i: impls[label][1].client.mget([impls[label][1].prefix + k for k in keys[i]]),
        }
        for label in impls:  # both answer every key, bit-identical arrays
            for i in range(len(calls)):
                got = lookup(label, i)
                assert all(e is not None for e in got), f"{label}: a stored entry was not found or not valid"
        for i in range(len(calls)):
            a, b = (lookup(label, i) for label in ("baseline", "this"))
            assert all(x["fingerprints"].tobytes() == y["fingerprints"].tobytes() and
                       np.array_equal(x["units"], y["units"]) for x, y in zip(a, b))
        times = {(m, label): [] for m in timed for label in impls}
        for r in range(args.rounds):
            for i in range(len(calls)):
                for m, fn in timed.items():
                    order = list(impls) if (r + i) % 2 == 0 else list(impls)[::-1]  # alternate
                    for label in order:
                        t0 = time.perf_counter()
                        fn(label, i)
                        times[m, label].append(time.perf_counter() - t0)
        load = [round(x, 2) for x in os.getloadavg()]

    print(f"NQ {150}-{150 + args.n - 1}: {args.n} calls x {args.rounds} rounds, 20 chunks a call; "
          f"this checkout vs {args.baseline}; load average {load}")
    print(f"value bytes per call: baseline {sizes['baseline'] / 2**20:.3f} MiB, this {sizes['this'] / 2**20:.3f} MiB; "
          f"redis-py parser: {'hiredis' if HIREDIS_AVAILABLE else 'Python'}")
    print(f"{'ms per call':<12}" + "".join(f"  {label + ' median':>26}{'p95':>8}" for label in impls)
          + f"{'this/base':>11}")
    for m in timed:
        row = {label: _ms(times[m, label]) for label in impls}
        print(f"{m:<12}" + "".join(f"  {row[label]['median']:>26}{row[label]['p95']:>8}" for label in impls)
              + f"{row['this']['median'] / row['baseline']['median']:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
