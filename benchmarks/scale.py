"""Scale-out benchmark: replicas sharing fingerprints through Redis, pre-warming, outages.

    python -m benchmarks.scale                      # CPU, 60 NQ questions (150-209), writes results/scale.*
    python -m benchmarks.scale --n 291 --device cuda # all held-out questions (150-440) on a GPU machine

Needs the evaluation data in ../shared/data (or --data-dir / $SEMTOKEN_DATA_DIR), a ``redis-server``
binary (``scripts/setup.sh`` installs Debian's) and the ``redis`` and ``ray`` extras. Passages are the
20 retrieved passages of NQ questions 150-440 (the held-out part; the method was tuned on 0-149).

Measures
  (a) two replica processes sharing one Redis: the second replica's first calls, on chunks the first
      replica encoded, against the first replica's cold calls; the Redis round trip (one MGET and
      decoding) for one call's 20 chunks, over 20 passes of the calls on a connected client;
  (b) pre-warm throughput in passages/s: the raw encoder, ``prewarm`` in-process, ``prewarm`` on a
      local Ray cluster;
  (c) Redis killed and restarted mid-run: failed calls, store errors, and whether every output is
      identical to a run without a store;
  (d) query-time calls on a pre-warmed corpus against cold calls (same process, fresh engines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from .cli import _write_json, machine_info
from .data import load_nq, main_guard

FIRST_HELD_OUT, LAST = 150, 440
RATE = 0.33
ROUND_TRIP_ROUNDS = 20  # passes over the calls' keys when timing the Redis round trip alone


def _median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 2) if xs else float("nan")


def _p95_ms(xs: list[float]) -> float:
    return round(1000 * sorted(xs)[min(len(xs) - 1, int(0.95 * len(xs)))], 2) if xs else float("nan")


def _engine(device: str, **fields):
    from semtoken_rag import SemToken, SemTokenConfig

    return SemToken(SemTokenConfig(device=device, **fields))


def _calls(engine, questions: list[tuple[str, list[str]]]) -> tuple[list[float], list[tuple], int]:
    """Compress every question; (seconds per call, outputs, encoder batches over chunks)."""
    seconds, outputs, batches = [], [], 0
    for query, chunks in questions:
        t0 = time.perf_counter()
        res = engine.compress(chunks, query, rate=RATE)
        seconds.append(time.perf_counter() - t0)
        outputs.append(tuple((c.text, c.kept_spans) for c in res.chunks))
        batches += res.encoder_calls
    return seconds, outputs, batches


def _replica(url: str, device: str, questions: list[tuple[str, list[str]]]) -> dict:
    """One replica process: a fresh engine on the shared store, the same calls; its latencies."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    engine = _engine(device, store=url)
    engine.compress(["warm up the encoder once"], "warm up", rate=0.5)  # weights paged in, not timed
    seconds, _, batches = _calls(engine, questions)
    s = engine.cache_stats()
    return {"median_ms": _median_ms(seconds), "p95_ms": _p95_ms(seconds), "calls": len(seconds),
            "encoder_batches_over_chunks": batches, "hits": s.hits, "misses": s.misses,
            "store_errors": s.store_errors}


def _in_child(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_replicas(server, device: str, questions) -> dict:
    """(a) replica 1 cold (fills Redis), then replica 2 in another process; the MGET round trip."""
    from semtoken_rag.keys import cache_key
    from semtoken_rag.redis_store import RedisStore

    server.client().flushall()
    first = _in_child(_replica, server.url, device, questions)
    second = _in_child(_replica, server.url, device, questions)
    engine = _engine(device, store=server.url)
    store = engine.cache.backend
    mget, raw, client = [], [], store.client
    keys = [[cache_key(c, engine.encoder.identity) for c in chunks] for _, chunks in questions]
    assert all(g is not None for ks in keys for g in store.get_many(ks)), "replica 1 should have stored every chunk"
    for _ in range(ROUND_TRIP_ROUNDS):  # connection made above; the two measures alternate call by call
        for ks in keys:
            t0 = time.perf_counter()
            store.get_many(ks)
            mget.append(time.perf_counter() - t0)
            names = [store.prefix + k for k in ks]
            t0 = time.perf_counter()
            values = client.mget(names)
            raw.append(time.perf_counter() - t0)
    size = statistics.mean(sum(len(v) for v in client.mget(
        [store.prefix + cache_key(c, engine.encoder.identity) for c in chunks])) for _, chunks in questions)
    assert isinstance(store, RedisStore) and values
    return {"replica1_cold": first, "replica2_first_calls": second,
            "replica2_over_cold": round(second["median_ms"] / first["median_ms"], 3),
            "redis_round_trip_20_chunks_ms": {"median": _median_ms(mget), "p95": _p95_ms(mget)},
            "redis_mget_only_ms": {"median": _median_ms(raw), "p95": _p95_ms(raw)},
            "bytes_per_call": int(size)}


def bench_prewarm(server, device: str, texts: list[str], use_ray: bool, ray_cpus: int) -> dict:
    """(b) raw encoder vs prewarm in-process vs prewarm on Ray, passages/s over the same texts."""
    import torch

    from semtoken_rag import SemTokenConfig
    from semtoken_rag.prewarm import prewarm_corpus

    out: dict = {"passages": len(texts)}
    engine = _engine(device)
    engine.encoder.fingerprint(texts[:32])  # warm-up
    with torch.inference_mode():
        t0 = time.perf_counter()
        for i in range(0, len(texts), 256):
            engine.encoder.fingerprint(texts[i:i + 256])
        raw = time.perf_counter() - t0
    out["raw_encoder_passages_per_s"] = round(len(texts) / raw, 1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        config = SemTokenConfig(device=device, store=server.url)
        from semtoken_rag.registry import shared_engine

        shared_engine(config).encoder.fingerprint(texts[:32])  # load before timing
        server.client().flushall()
        rep = prewarm_corpus(corpus, config)
        out["in_process"] = rep.to_dict()
        out["in_process_over_raw"] = round(rep.passages_per_second / out["raw_encoder_passages_per_s"], 3)
        again = prewarm_corpus(corpus, config)  # resume: everything is stored already
        out["resume_rerun"] = again.to_dict()
        if use_ray:
            import ray

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            t0 = time.perf_counter()
            ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            out["ray_init_s"] = round(time.perf_counter() - t0, 1)
            try:
                server.client().flushall()
                rep = prewarm_corpus(corpus, config, use_ray=True)
                out["ray"] = {**rep.to_dict(), "cluster_cpus": ray_cpus,
                              "cluster_gpus": int(ray.cluster_resources().get("GPU", 0))}
            finally:
                ray.shutdown()
    return out


def bench_outage(server, device: str, questions) -> dict:
    """(c) the same calls twice with Redis behind a memory-less engine; killed and restarted in pass 2."""
    reference = _engine(device, cache_max_bytes=0)
    _, expected, _ = _calls(reference, questions)
    server.client().flushall()
    engine = _engine(device, store=server.url, cache_max_bytes=0, store_timeout_seconds=0.1)
    _calls(engine, questions)  # pass 1 fills Redis
    n, failed, outputs, events = len(questions), 0, [], []
    for i, (query, chunks) in enumerate(questions):
        if i == n // 3:
            server.stop()
            events.append(f"killed before call {i}")
        if i == 2 * n // 3:
            server.start()
            events.append(f"restarted (empty) before call {i}")
        try:
            res = engine.compress(chunks, query, rate=RATE)
            outputs.append(tuple((c.text, c.kept_spans) for c in res.chunks))
        except Exception as e:  # noqa: BLE001 - what the benchmark counts
            failed += 1
            outputs.append(repr(e))
    s = engine.cache_stats()
    same = sum(a == b for a, b in zip(outputs, expected))
    return {"calls": n, "failed_calls": failed, "identical_outputs": same, "events": events,
            "store_errors": s.store_errors, "hits": s.hits, "misses": s.misses,
            "skipped_in_backoff": engine.cache.backend.skipped}


def bench_prewarmed_queries(server, device: str, questions) -> dict:
    """(d) fresh engines: cold without a store vs on the store pre-warmed in (b)/(a)."""
    texts = list(dict.fromkeys(c for _, chunks in questions for c in chunks))
    filler = _engine(device, store=server.url)
    filler.prewarm(texts)
    cold = _engine(device)
    cold.compress(["warm up the encoder once"], "warm up", rate=0.5)
    cold_s, cold_out, cold_batches = _calls(cold, questions)
    warm = _engine(device, store=server.url)
    warm.compress(["warm up the encoder once"], "warm up", rate=0.5)
    warm_s, warm_out, warm_batches = _calls(warm, questions)
    return {"cold": {"median_ms": _median_ms(cold_s), "p95_ms": _p95_ms(cold_s),
                     "encoder_batches_over_chunks": cold_batches},
            "prewarmed": {"median_ms": _median_ms(warm_s), "p95_ms": _p95_ms(warm_s),
                          "encoder_batches_over_chunks": warm_batches,
                          "hits": warm.cache_stats().hits, "misses": warm.cache_stats().misses},
            "prewarmed_over_cold": round(statistics.median(warm_s) / statistics.median(cold_s), 3),
            "identical_outputs": sum(a == b for a, b in zip(cold_out, warm_out))}


def markdown(r: dict) -> str:
    m, a, b, c, d = r["machine"], r["replicas"], r["prewarm"], r["outage"], r["prewarmed_queries"]
    lines = [
        "# Scale-out: Redis-shared fingerprints, pre-warming, outages", "",
        (f"`{r['command']}` on {m['processor']} ({m['cpu_count']} cores, torch threads {m['torch_threads']}), "
        f"device {r['device']}; load average {m['loadavg_start']} at the start, {m.get('loadavg_end')} at the "
        "end (a load above the core count means other work shared the machine and slowed every figure)."),
        (f"Passages: the 20 retrieved passages of NQ questions {r['questions']} ({r['n_questions']} calls, "
        f"{b['passages']} distinct passages), rate {RATE}. Redis {r['redis_version']} on 127.0.0.1; redis-py "
        f"{r.get('redis_client', '?')} with the {r.get('redis_parser', '?')} reply parser."), "",
        "| measure | figure | target |", "|---|---|---|",
        (f"| (a) replica 2's first calls via Redis / replica 1 cold (median) | {a['replica2_over_cold']:.3f}x "
        f"({a['replica2_first_calls']['median_ms']} ms vs {a['replica1_cold']['median_ms']} ms) | <= 0.1x |"),
        (f"| (a) Redis round trip, one call's 20 chunks (MGET + decode; {ROUND_TRIP_ROUNDS} passes), median / p95 | "
        f"{a['redis_round_trip_20_chunks_ms']['median']} / {a['redis_round_trip_20_chunks_ms']['p95']} ms "
        f"({a['bytes_per_call'] / 2**20:.2f} MiB; MGET alone {a['redis_mget_only_ms']['median']} ms) | <= 2 ms |"),
        f"| (b) raw encoder | {b['raw_encoder_passages_per_s']} passages/s | |",
        (f"| (b) pre-warm in-process (into Redis) | {b['in_process']['passages_per_second']:.1f} passages/s "
        f"({b['in_process_over_raw']:.2f}x raw) | within 1.1x of raw |"),
        (f"| (b) pre-warm re-run (resume: all stored) | {b['resume_rerun']['encoded']} encoded, "
        f"{b['resume_rerun']['seconds']:.2f} s | |"),
    ]
    if "ray" in b:
        lines.append(f"| (b) pre-warm on Ray ({b['ray']['cluster_cpus']} CPUs, {b['ray']['cluster_gpus']} GPUs; "
                     f"actor start-up included, ray.init {b['ray_init_s']} s not) | "
                     f"{b['ray']['passages_per_second']:.1f} passages/s | GPU: >= 2,800 on an H100 |")
    lines += [
        (f"| (c) Redis killed at call {c['calls'] // 3}, restarted empty at {2 * c['calls'] // 3}: failed calls | "
        f"{c['failed_calls']} of {c['calls']} | 0 |"),
        f"| (c) outputs identical to a run without a store | {c['identical_outputs']} of {c['calls']} | all |",
        (f"| (c) store errors counted / calls answered locally in back-off | {c['store_errors']} / "
        f"{c['skipped_in_backoff']} | |"),
        (f"| (d) query-time on a pre-warmed corpus / cold (median) | {d['prewarmed_over_cold']:.3f}x "
        f"({d['prewarmed']['median_ms']} ms vs {d['cold']['median_ms']} ms; encoder batches over chunks "
        f"{d['prewarmed']['encoder_batches_over_chunks']} vs {d['cold']['encoder_batches_over_chunks']}) | |"),
        f"| (d) outputs identical pre-warmed vs cold | {d['identical_outputs']} of {r['n_questions']} | all |",
        "", "Raw figures: `scale.json`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=60, help="questions from 150 on (default 60; 291 = all held-out)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray pre-warm")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="scale")
    args = p.parse_args(argv)
    if not 1 <= args.n <= LAST - FIRST_HELD_OUT + 1:
        p.error(f"--n must be in 1..{LAST - FIRST_HELD_OUT + 1}")
    from semtoken_rag.testing import LocalRedis

    command = "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    records = load_nq(args.n, data_dir=args.data_dir, start=FIRST_HELD_OUT)
    questions = [(r.question, list(r.chunks)) for r in records]
    texts = list(dict.fromkeys(c for _, chunks in questions for c in chunks))
    results = {"command": command, "device": args.device, "machine": machine, "n_questions": len(questions),
               "questions": f"{FIRST_HELD_OUT}-{FIRST_HELD_OUT + len(questions) - 1}"}
    with LocalRedis() as server:
        import redis
        from redis.utils import HIREDIS_AVAILABLE

        results["redis_version"] = server.client().info("server")["redis_version"]
        results["redis_client"] = redis.__version__
        results["redis_parser"] = "hiredis" if HIREDIS_AVAILABLE else "Python"  # hiredis: the redis extra
        for name, fn in (("replicas", lambda: bench_replicas(server, args.device, questions)),
                         ("prewarm", lambda: bench_prewarm(server, args.device, texts, not args.no_ray,
                                                           args.ray_cpus)),
                         ("prewarmed_queries", lambda: bench_prewarmed_queries(server, args.device, questions)),
                         ("outage", lambda: bench_outage(server, args.device, questions))):
            t0 = time.perf_counter()
            print(f"[scale] {name} ...", file=sys.stderr, flush=True)
            results[name] = fn()
            print(f"[scale] {name}: {time.perf_counter() - t0:.0f} s {json.dumps(results[name])}",
                  file=sys.stderr, flush=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"{args.name}.json", results)
    (out / f"{args.name}.md").write_text(markdown(results), encoding="utf-8")
    print(f"[scale] wrote {out / (args.name + '.json')}, {out / (args.name + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
