"""Host-side cost of a call, side by side with another checkout: cold and warm ``compress`` against the
encoder forward alone.

On NQ questions 150-169 (20 passages each) at rate 0.33, per question: the encoder forward alone over
the question's passages (tokenized beforehand, as ``benchmarks.gpu`` times it), a cold call (caches
cleared), a warm call (same chunks and query, same rate: fingerprints, query vector and per-chunk
analyses cached), a warm call at another rate (0.5) and one with a new query on the cached chunks (its
query embedded). Reported: medians (ms), cold / forward and warm / cold (medians of the per-question
ratios).

Each measurement runs in a fresh worker process; with ``--baseline-python`` the workers alternate
between that interpreter (another checkout's venv, importing its own code) and this one, round after
round, so that both see the same machine load::

    python -m benchmarks.host_cost --baseline-python /work/main/.venv/bin/python --rounds 5

``--warm-only --cache-dir DIR`` times warm calls alone (the median of 5 per question, after one call
that reads the fingerprints from DIR and embeds the query): short runs, so more rounds fit a busy
machine; the first worker fills DIR when it is empty.

The worker runs this file by path (``python benchmarks/host_cost.py --worker``), so each interpreter
imports the ``semtoken_rag`` its venv installs, not the one of the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATE, OTHER_RATE = 0.33, 0.5
START, N = 150, 20


def worker(out: str, threads: int | None, data: str | None, warm_only: bool = False,
           cache_dir: str | None = None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import semtoken_rag
    from semtoken_rag import SemToken, SemTokenConfig
    from semtoken_rag.datasets import load_nq

    recs = load_nq(N + 1, data, "random", start=START)
    qs, spare = recs[:N], recs[N]
    engine = SemToken(SemTokenConfig(device="cpu", cache_dir=cache_dir))
    engine.compress(list(spare.chunks), spare.question, rate=RATE)  # first-call set-up, not measured
    engine.compress(list(spare.chunks), spare.question, rate=RATE)
    rows = []
    if warm_only:  # fingerprints from cache_dir (filled by an earlier run): no encoder pass but the queries'
        for q in qs:
            chunks = list(q.chunks)
            engine.compress(chunks, q.question, rate=OTHER_RATE)  # loads fingerprints, embeds the query
            times = []
            for _ in range(5):
                t = time.perf_counter()
                engine.compress(chunks, q.question, rate=RATE)
                times.append(time.perf_counter() - t)
            rows.append({"warm": statistics.median(times)})
        Path(out).write_text(json.dumps({"code": semtoken_rag.__file__, "threads": torch.get_num_threads(),
                                         "rows": rows}))
        return
    for q in qs:
        chunks = list(q.chunks)
        forward = engine.encoder.forward_seconds(chunks)
        engine.clear_caches()
        t = time.perf_counter()
        engine.compress(chunks, q.question, rate=RATE)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        engine.compress(chunks, q.question, rate=RATE)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        engine.compress(chunks, q.question, rate=OTHER_RATE)
        warm_other = time.perf_counter() - t
        t = time.perf_counter()
        engine.compress(chunks, q.question + " exactly?", rate=RATE)
        new_query = time.perf_counter() - t
        rows.append({"forward": forward, "cold": cold, "warm": warm, "warm_other": warm_other,
                     "new_query": new_query})
    Path(out).write_text(json.dumps({"code": semtoken_rag.__file__, "threads": torch.get_num_threads(),
                                     "rows": rows}))


def summary(rows: list[dict]) -> dict:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows) * 1000

    if "cold" not in rows[0]:
        return {"warm_ms": med("warm"), "calls": len(rows)}

    return {"forward_ms": med("forward"), "cold_ms": med("cold"), "warm_ms": med("warm"),
            "warm_other_ms": med("warm_other"), "new_query_ms": med("new_query"),
            "cold_over_forward": statistics.median(r["cold"] / r["forward"] for r in rows),
            "warm_over_cold": statistics.median(r["warm"] / r["cold"] for r in rows),
            "calls": len(rows)}


def run(python: str, threads: int | None, data: str | None, warm_only: bool = False,
        cache_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [python, str(Path(__file__).resolve()), "--worker", out]
        if threads:
            cmd += ["--threads", str(threads)]
        if data:
            cmd += ["--data", data]
        if warm_only:
            cmd += ["--warm-only"]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
        subprocess.run(cmd, check=True, cwd=tmp)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-python", help="interpreter of the checkout to compare with (its venv's python)")
    ap.add_argument("--rounds", type=int, default=3, help="worker runs per side, alternating")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data", default=None, help="NQ file or folder (default: $SEMTOKEN_RAG_DATA / sample)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--warm-only", action="store_true",
                    help="time warm calls only (median of 5 per question), fingerprints read from --cache-dir")
    ap.add_argument("--cache-dir", default=None, help="fingerprint directory (warm-only: fill it first with a "
                                                      "run without --warm-only, or let the first round do it)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads, args.data, args.warm_only, args.cache_dir)
        return {}
    # the workers run in a temporary folder: paths given relative to here must not change meaning there
    data = str(Path(args.data).resolve()) if args.data else None
    from semtoken_rag.datasets import NQ_FILE
    if data and not (Path(data).is_file() or (Path(data) / NQ_FILE).is_file()):
        # before any worker starts (their traceback would hide this); the workers run this file by path,
        # outside the package, so the check is here rather than benchmarks.data's guard
        print(f"[bench] error: no NQ file at {data} (pass --data with the NQ file or its folder, "
              f"../shared/data in the project's checkout)", file=sys.stderr)
        raise SystemExit(2)
    cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else None
    sides = {"this": sys.executable}
    if args.baseline_python:
        sides = {"baseline": args.baseline_python, **sides}
    rows: dict[str, list[dict]] = {k: [] for k in sides}
    code: dict[str, str] = {}
    for r in range(args.rounds):
        for name, python in sides.items():
            got = run(python, args.threads, data, args.warm_only, cache_dir)
            rows[name] += got["rows"]
            code[name] = got["code"]
            print(f"round {r + 1}/{args.rounds} {name}: {json.dumps(summary(got['rows']))}", flush=True)
    result = {name: {"code": code[name], **summary(rows[name])} for name in sides}
    if args.warm_only:
        print(f"\nNQ {START}-{START + N - 1}, rate {RATE}, warm calls only, threads {args.threads or 'default'}, "
              f"{args.rounds} rounds per side")
        for name, s in result.items():
            print(f"{name} ({s['code']}): median warm {s['warm_ms']:.2f} ms over {s['calls']} questions")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    print(f"\nNQ {START}-{START + N - 1}, rate {RATE}, device cpu, threads {args.threads or 'default'}, "
          f"{args.rounds} rounds per side (medians over all calls)")
    print("| side | forward ms | cold ms | warm ms | warm ms (rate 0.5) | new query ms | cold / forward "
          "| warm / cold |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in result.items():
        print(f"| {name} ({s['code']}) | {s['forward_ms']:.1f} | {s['cold_ms']:.1f} | {s['warm_ms']:.2f} | "
              f"{s['warm_other_ms']:.2f} | {s['new_query_ms']:.2f} | {s['cold_over_forward']:.3f} | {s['warm_over_cold']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
