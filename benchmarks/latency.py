"""Engine cost, side by side in one run: encoder forward alone (the floor), cold call, fully cached call,
and a 5-turn chat whose turns share chunks.

    python -m benchmarks.latency [--n 30] [--rate 0.33]

Needs ../shared/data (the NQ 20-passage file). Prints medians and ratios; writes
benchmarks/results/latency.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from semtoken_rag import SemToken, SemTokenConfig

from .data import EVAL, load_nq, main_guard

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="questions (20 passages each)")
    ap.add_argument("--rate", type=float, default=0.33)
    args = ap.parse_args(argv)
    records = load_nq(n=args.n + 5, start=EVAL.start)  # questions 150 on, outside the tuning split
    engine = SemToken(SemTokenConfig(device="cpu"))
    for r in records[-5:]:  # warm-up: first calls pay one-off allocation costs
        engine.compress(r.chunks, r.question, rate=args.rate)
    floor, cold, warm, enc_tokens = [], [], [], []
    for r in records[: args.n]:
        enc_tokens.append(sum(len(x) for x in engine.encoder.tokenizer(r.chunks, add_special_tokens=False)
                              ["input_ids"]))
        floor.append(engine.encoder.forward_seconds(r.chunks))
        engine.cache.clear()
        getattr(engine, "analyses", engine.cache).clear()  # per-chunk analyses too: a cold call does them
        t = time.perf_counter()
        engine.compress(r.chunks, r.question, rate=args.rate)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.compress(r.chunks, r.question + " exactly?", rate=args.rate)  # new query, cached chunks
        warm.append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in (("floor", floor), ("cold", cold), ("warm", warm))}
    ratio_cold = statistics.median(c / f for c, f in zip(cold, floor))
    ratio_warm = statistics.median(w / c for w, c in zip(warm, cold))
    print(f"{args.n} questions x 20 passages, median {statistics.median(enc_tokens):.0f} encoder tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"encoder forward alone (floor): {med['floor'] * 1000:7.1f} ms")
    print(f"cold compress:                 {med['cold'] * 1000:7.1f} ms   cold/floor = {ratio_cold:.2f}")
    print(f"fully cached compress:         {med['warm'] * 1000:7.1f} ms   warm/cold  = {ratio_warm:.3f}")
    chat = _chat(engine, records, args.rate)
    stats = engine.cache_stats()
    per_chunk = stats.memory_bytes / max(stats.entries, 1)
    print(f"cache: {stats.entries} chunks, {per_chunk / 1024:.1f} KiB per cached chunk (float16)")
    out = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}, "
           f"{torch.get_num_threads()} torch threads", "n": args.n, "rate": args.rate,
           "median_encoder_tokens": statistics.median(enc_tokens), "median_ms": {k: v * 1000 for k, v in med.items()},
           "cold_over_floor": ratio_cold, "warm_over_cold": ratio_warm, "chat": chat,
           "bytes_per_cached_chunk": per_chunk}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(out, indent=2))
    return out


def _chat(engine: SemToken, records, rate: float) -> list[dict]:
    """5 turns; each retrieves 10 passages of the previous turn's question and 10 new ones."""
    engine.cache.clear()
    getattr(engine, "analyses", engine.cache).clear()
    rng = np.random.default_rng(0)
    base = records[0]
    pool = [c for r in records[1:6] for c in r.chunks]
    previous = list(base.chunks)
    turns = []
    print("chat turn | shared chunks | encoder calls | ms    | tokens before -> after")
    for turn in range(5):
        if turn == 0:
            chunks = previous
        else:
            keep = [previous[i] for i in sorted(rng.choice(20, 10, replace=False))]
            new = [pool[i] for i in rng.choice(len(pool), 10, replace=False)]
            chunks = keep + new
        shared = len(set(chunks) & set(previous)) if turn else 0
        t = time.perf_counter()
        res = engine.compress(chunks, records[turn].question, rate=rate, conversation_id="chat")
        ms = (time.perf_counter() - t) * 1000
        print(f"{turn + 1:9d} | {shared:13d} | {res.encoder_calls:13d} | {ms:5.0f} | "
              f"{res.original_tokens} -> {res.compressed_tokens}")
        turns.append({"turn": turn + 1, "shared_chunks": shared, "encoder_calls": res.encoder_calls,
                      "cache_hits": res.cache_hits, "ms": ms, "original_tokens": res.original_tokens,
                      "compressed_tokens": res.compressed_tokens})
        previous = chunks
    return turns


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
