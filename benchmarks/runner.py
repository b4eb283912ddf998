"""Runs methods over questions and budgets and aggregates recall, budget compliance and cost."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from . import memory
from .data import NQRecord
from .metrics import TokenCounter, answer_in, budget_for, mean, median, percentile
from .peers.base import Method, join_context


@dataclass
class MethodRun:
    """Per-question raw numbers of one method on one question set."""

    name: str
    label: str
    budgets: list[float]
    question_ids: list[int] = field(default_factory=list)
    hit: dict = field(default_factory=dict)          # rate -> [0/1]
    tokens: dict = field(default_factory=dict)       # rate -> [int]
    budget: dict = field(default_factory=dict)       # rate -> [int]
    original: list[int] = field(default_factory=list)
    latency: dict = field(default_factory=dict)      # rate -> [s] (cold or independent calls)
    prepare_s: list[float] = field(default_factory=list)
    warm_latency: list[float] = field(default_factory=list)
    cold_first: list[float] = field(default_factory=list)   # methods with a cache: first call per question
    warm_mismatch: int = 0
    encoder_tokens: int = 0
    encoder_seconds: float = 0.0
    setup_s: float = 0.0
    rss_baseline_mb: float = float("nan")
    rss_peak_mb: float = float("nan")
    rss_reset_ok: bool = False
    texts: dict = field(default_factory=dict)        # (question index, rate) -> kept pieces, for e2e

    def __post_init__(self):
        for r in self.budgets:
            self.hit.setdefault(r, [])
            self.tokens.setdefault(r, [])
            self.budget.setdefault(r, [])
            self.latency.setdefault(r, [])


def run_method(method: Method, records: Sequence[NQRecord], budgets: Sequence[float], counter: TokenCounter,
               keep_texts: dict | None = None, measure_cost: bool = True, desc: str | None = None,
               clear_cache: bool = True, do_setup: bool = True) -> MethodRun:
    """Run one method; ``keep_texts`` maps rate -> set of question indices whose outputs to keep."""
    run = MethodRun(method.name, method.label, list(budgets))
    gc.collect()
    run.rss_baseline_mb = memory.current_rss_mb()
    run.rss_reset_ok = memory.reset_peak()
    t0 = time.perf_counter()
    if do_setup:
        method.setup()
    run.setup_s = time.perf_counter() - t0
    for rec in tqdm(records, desc=desc or method.name, unit="q", leave=False, dynamic_ncols=True):
        chunks, query = list(rec.chunks), rec.question
        original = counter.context_tokens(chunks)
        run.question_ids.append(rec.index)
        run.original.append(original)
        if clear_cache:
            method.clear_cache()
        t = time.perf_counter()
        state = method.prepare(chunks, query)
        prep = time.perf_counter() - t
        run.prepare_s.append(prep)
        for bi, rate in enumerate(budgets):
            budget = budget_for(original, rate)
            t = time.perf_counter()
            out = method.select(state, chunks, query, rate, budget)
            lat = prep + time.perf_counter() - t
            if method.measures_warm and bi == 0:
                run.cold_first.append(lat)
                t = time.perf_counter()
                again = method.select(state, chunks, query, rate, budget)
                run.warm_latency.append(time.perf_counter() - t)
                if list(again.texts) != list(out.texts):
                    run.warm_mismatch += 1
            elif method.measures_warm:
                run.warm_latency.append(lat)
            n_tok = counter.context_tokens(out.texts)
            run.hit[rate].append(int(answer_in(rec.answers, join_context(out.texts))))
            run.tokens[rate].append(n_tok)
            run.budget[rate].append(budget)
            run.latency[rate].append(lat)
            if out.encoder_tokens:
                run.encoder_tokens += out.encoder_tokens
                run.encoder_seconds += lat
            if keep_texts and rec.index in keep_texts.get(rate, ()):
                run.texts[(rec.index, rate)] = list(out.texts)
    run.rss_peak_mb = memory.peak_rss_mb()
    return run


def summarize(run: MethodRun) -> dict:
    """Aggregate numbers of one run (JSON-able)."""
    per_budget = {}
    for rate in run.budgets:
        toks, buds = run.tokens[rate], run.budget[rate]
        ratios = [t / o for t, o in zip(toks, run.original) if o]
        over = [i for i, (t, b) in enumerate(zip(toks, buds)) if t > b]
        per_budget[str(rate)] = {
            "n": len(toks),
            "recall": mean(run.hit[rate]),
            "hits": int(sum(run.hit[rate])),
            "achieved_ratio_mean": mean(ratios),
            "achieved_ratio_total": sum(toks) / max(1, sum(run.original[:len(toks)])),
            "tokens_mean": mean(toks),
            "over_budget": len(over),
            "over_budget_excess_mean": mean([(toks[i] - buds[i]) / buds[i] for i in over]) if over else 0.0,
            "latency_median_s": median(run.latency[rate]),
            "latency_p95_s": percentile(run.latency[rate], 95),
        }
    if run.cold_first:     # a method with a cache: cold = first call per question
        cold = run.cold_first
    else:
        cold = [x for r in run.budgets for x in run.latency[r]]
    return {
        "name": run.name,
        "label": run.label,
        "n_questions": len(run.question_ids),
        "budgets": per_budget,
        "latency": {
            "cold_median_s": median(cold), "cold_p95_s": percentile(cold, 95), "cold_n": len(cold),
            "warm_median_s": median(run.warm_latency) if run.warm_latency else None,
            "warm_p95_s": percentile(run.warm_latency, 95) if run.warm_latency else None,
            "warm_n": len(run.warm_latency),
            "prepare_median_s": median(run.prepare_s),
        },
        "warm_output_mismatches": run.warm_mismatch,
        "encoder_tokens_per_s": (run.encoder_tokens / run.encoder_seconds) if run.encoder_seconds else None,
        "setup_s": run.setup_s,
        "memory": {
            "rss_baseline_mb": run.rss_baseline_mb,
            "rss_peak_mb": run.rss_peak_mb,
            "peak_is_per_method": run.rss_reset_ok,
            "how": "resource.getrusage(RUSAGE_SELF).ru_maxrss after resetting the high-water mark via "
                   "/proc/self/clear_refs before setup (whole process: includes models of earlier methods)"
                   if run.rss_reset_ok else "resource.getrusage ru_maxrss, process lifetime peak",
        },
    }


def per_question(run: MethodRun) -> dict:
    return {
        "question_index": run.question_ids,
        "original_tokens": run.original,
        **{str(r): {"hit": run.hit[r], "tokens": run.tokens[r], "budget": run.budget[r],
                    "latency_s": [round(x, 5) for x in run.latency[r]]} for r in run.budgets},
    }
