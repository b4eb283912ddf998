"""Throughput of K worker processes compressing at once, each with its own engine: how an app server with
K workers (``uvicorn --workers K``, gunicorn) runs semtoken-rag, against one process.

A call's host work (analysis, scoring, selection, rendering: all of a warm call, most of a cold one on
CUDA) holds the GIL, so one process serves it on one core however many the host has; threads and
``compress_many`` share the encoder pass, not that work. Worker processes do spread it. On CUDA they
share the device (each its own CUDA context, copy of the encoder and graphs). Each worker's torch gets
``cores // K`` threads, so that K workers do not oversubscribe the cores (what an app server's workers
should do too).

Two workloads over NQ questions from 150 on (held out; 20 passages each):

* ``cached``: every worker has compressed its questions once before the clock starts, then compresses
  them again ``--repeats`` times (a chat's later turns, a corpus pre-warmed into a shared store);
* ``new``: every call's chunks are new to its worker (the caches are cleared before each call).

Each worker is started (spawn), builds its engine and warms up, then all wait at one barrier; the wall
time runs from the barrier to the last worker's last call. Worker counts are timed in turn, the order
rotated each round (``--rounds``); the figure is the median round. Needs the NQ file (``--data``)::

    python -m benchmarks.processes --workers 1 2            # this machine (2 cores)
    python -m benchmarks.processes --device cuda --encoder .gpu/model --data .gpu/data --workers 1 4 8 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from semtoken_rag.datasets import load_nq

from .data import main_guard, nq_source

FIRST_HELD_OUT = 150
WORKLOADS = ("cached", "new")


def _worker(cfg: dict, source: str, n: int, rate: float, workload: str, repeats: int, threads: int,
            barrier: Any, results: Any, start: int = FIRST_HELD_OUT) -> None:
    """One worker process: build an engine, warm up, wait at the barrier, time the workload."""
    import torch

    from semtoken_rag import SemToken, SemTokenConfig

    if threads:
        torch.set_num_threads(threads)
    try:
        qs = load_nq(n, source, start=start)
        if not qs:
            raise ValueError(f"no questions from {start} on in {source}")
        engine = SemToken(SemTokenConfig(**cfg))
        for q in qs:  # kernels and allocator; for "cached", every chunk and query into this worker's caches
            engine.compress(list(q.chunks), q.question, rate=rate)
        calls: list[float] = []
        barrier.wait(timeout=600)
        started = time.monotonic()  # (CLOCK_MONOTONIC: one clock for all processes of the machine)
        for _ in range(repeats if workload == "cached" else 1):
            for q in qs:
                if workload == "new":
                    engine.clear_caches()
                t = time.perf_counter()
                engine.compress(list(q.chunks), q.question, rate=rate)
                calls.append(time.perf_counter() - t)
        results.put({"pid": os.getpid(), "started": started, "ended": time.monotonic(), "calls": calls,
                     "error": None, "dtype": str(engine.encoder.dtype).replace("torch.", "")})
    except BaseException as e:  # noqa: BLE001 - any failure is reported, then the barrier broken so that
        # no other worker waits for this one (in that order: the cause arrives before their broken barriers)
        results.put({"pid": os.getpid(), "error": f"{type(e).__name__}: {e}"})
        barrier.abort()


def run_workers(k: int, cfg: dict, source: str, n: int, rate: float, workload: str, repeats: int,
                threads: int, start: int = FIRST_HELD_OUT) -> dict:
    """One timing of ``k`` worker processes running ``workload`` at once. A worker that fails, or dies
    without a word (killed, out of memory), raises here; the others are let go, none waits for good."""
    ctx = mp.get_context("spawn")  # (no forked torch or CUDA state; CUDA cannot be forked at all)
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, source, n, rate, workload, repeats, threads, barrier,
                                               results, start), daemon=True) for _ in range(k)]
    for p in procs:
        p.start()
    got: list[dict] = []
    try:
        while len(got) < k:
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:  # (a worker that has reported may end as it likes)
                reported = {g["pid"] for g in got}
                dead = [p.exitcode for p in procs if p.pid not in reported and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a worker process ended with exit code {dead[0]} before its result")
                continue
            if got[-1]["error"]:
                raise RuntimeError(f"a worker failed: {got[-1]['error']}")
    finally:
        barrier.abort()  # (after a failure: no worker waits for the ones that will never come)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    wall = max(g["ended"] for g in got) - min(g["started"] for g in got)
    calls = [c for g in got for c in g["calls"]]
    return {"workers": k, "calls": len(calls), "wall_s": wall, "queries_per_s": len(calls) / wall,
            "call_median_ms": 1000 * statistics.median(calls), "dtype": got[0]["dtype"]}


def measure(cfg: dict, source: str, workers: list[int], workloads: list[str], n: int, rate: float,
            repeats: int, rounds: int, cores: int, start: int = FIRST_HELD_OUT) -> dict:
    """Every worker count on every workload, ``rounds`` times, the counts' order rotated each round."""
    out: dict[str, Any] = {}
    for workload in workloads:
        runs: dict[int, list[dict]] = {k: [] for k in workers}
        for r in range(rounds):
            for k in workers[r % len(workers):] + workers[:r % len(workers)]:
                threads = max(1, cores // k)
                runs[k].append(run_workers(k, cfg, source, n, rate, workload, repeats, threads, start))
        rows = []
        for k in workers:
            qps = [x["queries_per_s"] for x in runs[k]]
            mid = sorted(runs[k], key=lambda x: x["queries_per_s"])[len(qps) // 2]
            rows.append({**mid, "rounds_queries_per_s": qps})
        base = rows[0]["queries_per_s"]
        for row in rows:
            row["over_first"] = row["queries_per_s"] / base
        out[workload] = rows
    return out


def markdown(r: dict) -> str:
    lines = [f"# semtoken-rag: K worker processes at once ({r['device_name']})", "",
             (f"{r['date']}; {r['cores']} CPU cores; torch {r['torch']}; encoder {r['encoder']} ({r['dtype']}) "
              f"on {r['device']}; NQ questions {FIRST_HELD_OUT}-{FIRST_HELD_OUT + r['n'] - 1} for each worker, 20 "
              f"passages each, rate {r['rate']}; {r['repeats']} passes over them when cached; median of "
              f"{r['rounds']} rounds, the worker counts' order rotated each round."),
             "", f"Command: `{r['command']}`", ""]
    for workload in r["results"]:
        first = r["results"][workload][0]["workers"]
        lines += [(f"| {workload} chunks: workers | queries/s | x {first} worker{'s' if first > 1 else ''} | "
                  "call median ms | rounds (queries/s) |"), "| --- | --- | --- | --- | --- |"]
        for row in r["results"][workload]:
            lines.append(f"| {row['workers']} | {row['queries_per_s']:.1f} | {row['over_first']:.2f} | "
                         f"{row['call_median_ms']:.1f} | "
                         f"{', '.join(f'{x:.1f}' for x in row['rounds_queries_per_s'])} |")
        lines.append("")
    lines.append(f"Whole run: {r['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.processes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the engine's choice)")
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts to compare")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--n", type=int, default=16, help="questions per worker (from 150 on)")
    ap.add_argument("--repeats", type=int, default=4, help="passes over the questions when cached")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--name", default=None, help="results/processes_NAME.{json,md} (default: the device type)")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 291 or min(args.workers) < 1 or args.repeats < 1 or args.rounds < 1:
        ap.error("--n must be in 1..291 and --workers, --repeats, --rounds positive")
    source = nq_source(args.data)
    import torch

    from .gpu import device_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = {"encoder": args.encoder, "device": device.type}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    started = time.perf_counter()
    results = measure(cfg, str(source), args.workers, args.workloads, args.n, args.rate, args.repeats,
                      args.rounds, cores)
    r = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device.type,
         "device_name": device_name(device), "cores": cores, "torch": torch.__version__,
         "encoder": args.encoder, "n": args.n, "rate": args.rate, "repeats": args.repeats, "rounds": args.rounds,
         "command": "python -m benchmarks.processes " + " ".join(argv if argv is not None else sys.argv[1:]),
         "dtype": next(iter(results.values()))[0]["dtype"], "results": results, "seconds": time.perf_counter() - started}
    out = Path(__file__).resolve().parent / "results" / f"processes_{args.name or device.type}"
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
