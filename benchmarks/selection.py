"""Selection on one huge chunk: a 1M-character chunk (wikitext-2 test) compressed end to end.

    python -m benchmarks.selection [--chars 1000000] [--rate 0.33]

Prints the cold call (encoder included), the cached call (fingerprints from the cache: spans, scores,
selection and rendering only) and budgeted selection alone on that call's segments. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import semtoken_rag.engine as engine_module
from semtoken_rag import SemToken, SemTokenConfig

from .data import resolve_data_dir


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    text = (resolve_data_dir(None) / "wikitext-2_test.tokens.txt").read_text(encoding="utf-8")
    text = (text * (args.chars // max(len(text), 1) + 1))[: args.chars]
    engine = SemToken(SemTokenConfig(device=args.device))
    timings: list[tuple[int, float]] = []
    select = engine_module.select_under_budget

    def timed(scores, *a, **k):
        t = time.perf_counter()
        out = select(scores, *a, **k)
        timings.append((len(scores), time.perf_counter() - t))
        return out

    engine_module.select_under_budget = timed
    try:
        t = time.perf_counter()
        res = engine.compress([text], "when was the song released", rate=args.rate)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        engine.compress([text], "when was the song released", rate=args.rate)
        warm = time.perf_counter() - t
    finally:
        engine_module.select_under_budget = select
    n_seg, sel = timings[-1]
    print(f"{len(text):,} characters, {res.original_tokens:,} tokens -> {res.compressed_tokens:,} "
          f"(budget {res.budget:,}), {n_seg:,} segments")
    print(f"cold compress (encoder included): {cold:8.2f} s")
    print(f"cached compress:                  {warm:8.2f} s")
    print(f"selection alone:                  {sel:8.2f} s")
    return {"chars": len(text), "segments": n_seg, "cold_s": cold, "cached_s": warm, "select_s": sel,
            "kept_fraction": float(np.mean([c.compressed_tokens for c in res.chunks])) / res.original_tokens}


if __name__ == "__main__":
    main()
