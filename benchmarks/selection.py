"""Budgeted selection on one huge chunk, before and after issue 13 (defect 2), and the same masks on NQ.

    python -m benchmarks.selection [--chars 1000000] [--rate 0.33] [--device cpu] [--no-before]
    python -m benchmarks.selection --nq 150:190 [--rates 0.2 0.33 0.5]

The first form compresses a ``--chars`` chunk of wikitext-2 (test) end to end and prints the cold call
(encoder included), the cached call (fingerprints from the cache: spans, scores, selection, rendering)
and budgeted selection alone on that call's segments, timed side by side in this process for the
selection before (:func:`select_before`, a verbatim copy of the quadratic version) and after
(:func:`semtoken_rag.budget.select_under_budget`), with whether their keep masks are identical.

The second form runs questions START:END of the NQ 20-passage set through the engine at each rate with
either selection and counts the calls whose ``kept_spans`` are identical. Needs ../shared/data (or
$SEMTOKEN_RAG_DATA). Questions 0-149 are the tuning split; check on 150 and later.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import time
from collections.abc import Callable, Iterator

import numpy as np

import semtoken_rag.engine as engine_module
from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.budget import select_under_budget

from .data import load_nq, main_guard, resolve_data_dir

QUERY = "when was the song released"


def select_before(scores, costs, groups, budget, gap_cost=0, allowed=None, vectors=None,
                  redundancy_weight=0.0, redundancy_threshold=0.5, group_overheads=None):
    """``select_under_budget`` as it was before issue 13 defect 2 (main at 53bb698), kept verbatim as
    the reference: each pop multiplies the kept rows it has not seen yet (O(segments x kept x dim))."""
    n = len(scores)
    keep = np.zeros(n, dtype=bool)
    if n == 0 or budget < 0:
        return keep
    allowed = np.ones(n, dtype=bool) if allowed is None else allowed
    scores = np.asarray(scores, dtype=np.float64)
    aware = vectors is not None and redundancy_weight > 0
    if aware:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        kept_mat = np.empty_like(vecs)
        best = np.full(n, -np.inf)
        seen = np.zeros(n, dtype=np.int64)
    n_kept = 0
    lowest = np.asarray(costs, dtype=np.int64) - abs(int(gap_cost))
    heap = [(-scores[i], i) for i in range(n) if allowed[i]]
    heapq.heapify(heap)
    slices: dict[int, int] = {}
    used = 0
    g = groups
    while heap:
        _, i = heapq.heappop(heap)
        if lowest[i] > budget - used:
            continue
        if aware and n_kept:
            if seen[i] < n_kept:
                best[i] = max(best[i], float(np.max(kept_mat[seen[i]:n_kept] @ vecs[i])))
                seen[i] = n_kept
            current = scores[i] - redundancy_weight * max(0.0, best[i] - redundancy_threshold)
            if heap and current < -heap[0][0]:
                heapq.heappush(heap, (-current, i))
                continue
        left = i > 0 and g[i - 1] == g[i] and keep[i - 1]
        right = i + 1 < n and g[i + 1] == g[i] and keep[i + 1]
        have = slices.get(g[i], 0)
        delta_slices = -1 if (left and right) else (0 if (left or right) else 1)
        gaps_before = max(have - 1, 0)
        gaps_after = max(have + delta_slices - 1, 0)
        cost = int(costs[i]) + gap_cost * (gaps_after - gaps_before)
        if have == 0 and group_overheads is not None:
            cost += int(group_overheads[g[i]])
        if used + cost <= budget:
            keep[i] = True
            used += cost
            slices[g[i]] = have + delta_slices
            if aware:
                kept_mat[n_kept] = vecs[i]
                n_kept += 1
    return keep


@contextlib.contextmanager
def engine_selection(select: Callable) -> Iterator[None]:
    """The engine selects with ``select`` inside the block."""
    if not hasattr(engine_module, "select_under_budget"):
        raise RuntimeError("semtoken_rag.engine no longer imports select_under_budget by name; update "
                           "benchmarks/selection.py to patch where the engine looks it up")
    saved = engine_module.select_under_budget
    engine_module.select_under_budget = select
    try:
        yield
    finally:
        engine_module.select_under_budget = saved


def huge_chunk(args: argparse.Namespace) -> dict:
    text = (resolve_data_dir(args.data_dir) / "wikitext-2_test.tokens.txt").read_text(encoding="utf-8")
    text = (text * (args.chars // max(len(text), 1) + 1))[: args.chars]
    engine = SemToken(SemTokenConfig(device=args.device))
    calls: list[tuple[tuple, dict, float]] = []

    def timed(*a, **k):
        t = time.perf_counter()
        out = select_under_budget(*a, **k)
        calls.append((a, k, time.perf_counter() - t))
        return out

    with engine_selection(timed):
        t = time.perf_counter()
        res = engine.compress([text], QUERY, rate=args.rate)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        engine.compress([text], QUERY, rate=args.rate)
        warm = time.perf_counter() - t
    a, k, _ = calls[-1]
    t = time.perf_counter()
    after_mask = select_under_budget(*a, **k)
    after = time.perf_counter() - t
    print(f"{len(text):,} characters, {res.original_tokens:,} tokens -> {res.compressed_tokens:,} "
          f"(budget {res.budget:,}), {len(a[0]):,} segments, {int(after_mask.sum()):,} kept")
    print(f"cold compress (encoder included): {cold:8.2f} s")
    print(f"cached compress:                  {warm:8.2f} s")
    print(f"selection after:                  {after:8.2f} s")
    out = {"chars": len(text), "segments": len(a[0]), "kept": int(after_mask.sum()), "cold_s": cold,
           "cached_s": warm, "select_s": after}
    if args.before:
        t = time.perf_counter()
        before_mask = select_before(*a, **k)
        before = time.perf_counter() - t
        same = bool(np.array_equal(before_mask, after_mask))
        print(f"selection before:                 {before:8.2f} s  (keep masks identical: {same})")
        out |= {"select_before_s": before, "identical": same}
    return out


def nq_masks(args: argparse.Namespace) -> dict:
    start, end = (int(x) for x in args.nq.split(":"))
    if start < 150:
        print(f"note: questions {start}-149 are the tuning split")
    records = load_nq(end - start, data_dir=args.data_dir, start=start)
    engine = SemToken(SemTokenConfig(device=args.device))
    same = total = 0
    differ: list[tuple[int, float]] = []
    spent = {"before": 0.0, "after": 0.0}
    for rec in records:
        for rate in args.rates:
            kept = {}
            for name, select in (("before", select_before), ("after", select_under_budget)):
                with engine_selection(select):
                    t = time.perf_counter()
                    res = engine.compress(list(rec.chunks), rec.question, rate=rate)
                    spent[name] += time.perf_counter() - t
                kept[name] = [c.kept_spans for c in res.chunks]
            total += 1
            if kept["before"] == kept["after"]:
                same += 1
            else:
                differ.append((rec.index, rate))
    print(f"questions {start}-{end - 1}, rates {args.rates}: kept_spans identical in {same} of {total} calls"
          + (f"; differ: {differ}" if differ else ""))
    print(f"compress time (fingerprints cached after the first call): before {spent['before']:.1f} s, "
          f"after {spent['after']:.1f} s")
    return {"identical": same, "calls": total, "differ": differ}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None, help="folder of the evaluation data (default: see "
                                                     "benchmarks.data.resolve_data_dir)")
    ap.add_argument("--no-before", dest="before", action="store_false",
                    help="skip timing the old selection (minutes on a 1M-character chunk)")
    ap.add_argument("--nq", default=None, metavar="START:END",
                    help="instead: compare kept_spans before/after on these NQ questions")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.33, 0.5])
    args = ap.parse_args(argv)
    return nq_masks(args) if args.nq else huge_chunk(args)


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
