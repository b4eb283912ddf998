"""Tail latency of a request stream, with Python's garbage collector as it is against ``gc.freeze()`` after
start-up, side by side in fresh processes.

A process that imported torch and transformers and loaded the encoder tracks some 400,000 container
objects. Python's full (generation 2) collection walks all of them: a pause of a few hundred milliseconds,
taken by whichever call allocates at that moment, every few hundred calls. ``gc.collect(); gc.freeze()``
once the engine is built and warmed up moves them out of the collector's sight (servers such as vLLM do so
after loading their model); later collections walk what was made since.

The stream: for each NQ question from 150 on, one call on its 20 passages (new to the process: cold),
then three more at other rates (cached: a chat's follow-ups). Each side runs in ``--rounds`` fresh
processes, alternating. Needs the NQ file (``--data``)::

    python -m benchmarks.tail_latency --n 200 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .data import main_guard, nq_source

SIDES = ("as is", "frozen")


def _stream(source: str, n: int, freeze: bool) -> dict:
    """One process's stream (run in a child: ``python -m benchmarks.tail_latency --child ...``)."""
    import gc

    from semtoken_rag import SemToken, SemTokenConfig
    from semtoken_rag.datasets import load_nq

    qs = load_nq(n, source, start=150)
    engine = SemToken(SemTokenConfig())
    for q in load_nq(3, source):  # warm-up (questions 0-2: not in the stream)
        engine.compress(list(q.chunks), q.question, rate=0.33)
    if freeze:
        gc.collect()
        gc.freeze()
    full = [0]
    gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (phase == "stop"
                                                                         and info["generation"] == 2)))
    cold, warm = [], []
    for q in qs:
        for i, rate in enumerate((0.33, 0.5, 0.33, 0.2)):
            t = time.perf_counter()
            engine.compress(list(q.chunks), q.question, rate=rate)
            (cold if i == 0 else warm).append(time.perf_counter() - t)
    return {"cold": cold, "warm": warm, "full_collections": full[0]}


def _quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(p * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tail_latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--n", type=int, default=200, help="questions in the stream (from 150 on)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternating")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    source = nq_source(args.data)
    if args.child:
        print(json.dumps(_stream(str(source), args.n, args.child == "frozen")))
        return 0
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    root = Path(__file__).resolve().parents[1]
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            out = subprocess.run([sys.executable, "-m", "benchmarks.tail_latency", "--child", side, "--data",
                                  str(source), "--n", str(args.n)], capture_output=True, text=True, cwd=root,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                     str(root), os.environ.get("PYTHONPATH")]))}, check=True)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"n": args.n, "rounds": args.rounds, "sides": {}}
    for side, rs in runs.items():
        cold = [x for r in rs for x in r["cold"]]
        warm = [x for r in rs for x in r["warm"]]
        result["sides"][side] = {
            "full_collections": [r["full_collections"] for r in rs],
            "cold_ms": {"p50": _quantile(cold, .5), "p99": _quantile(cold, .99), "max": 1000 * max(cold)},
            "warm_ms": {"p50": _quantile(warm, .5), "p99": _quantile(warm, .99), "max": 1000 * max(warm)},
            "warm_p50_by_round": [1000 * statistics.median(r["warm"]) for r in rs]}
    lines = [f"{args.n} questions x 4 calls a process, {args.rounds} processes a side, alternating",
             "| gc | full collections per process | cold p50 / p99 / max ms | warm p50 / p99 / max ms |",
             "| --- | --- | --- | --- |"]
    for side, f in result["sides"].items():
        c, w = f["cold_ms"], f["warm_ms"]
        lines.append(f"| {side} | {', '.join(map(str, f['full_collections']))} | {c['p50']:.1f} / {c['p99']:.1f} / "
                     f"{c['max']:.1f} | {w['p50']:.2f} / {w['p99']:.2f} / {w['max']:.1f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
