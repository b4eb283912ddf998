"""Recall levers of issue 14, ablated side by side on one split: each variant is today's defaults with
some scoring knobs changed, run on the same questions, chunks and cached fingerprints.

    python -m benchmarks.levers --start 0 --n 150 --name levers_tune        # tuning split: choose
    python -m benchmarks.levers --start 150 --n 291 --name levers_heldout   # held-out split: report

Requires the NQ file (``../shared/data`` or ``--data-dir``). The chunks of a question are encoded once
(first variant), the other variants reuse the fingerprints (their knobs change scoring and selection
only). Per variant and budget it prints answer recall, then the paired comparison against the reference
variant (``--ref``, default ``defaults``): questions only the variant keeps (+), only the reference
keeps (−), and the exact two-sided sign test. Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from .cli import machine_info
from .data import load_nq, main_guard
from .metrics import TokenCounter, answer_in, budget_for, mean, median
from .peers.base import join_context

BASE = {"device": "cpu", "cache_max_bytes": 8 * 2**30, "query_memo_max_bytes": 2**30}
# the defaults before issue 14: every lever off
BEFORE = {"lexical_weight": 0.0, "answer_type_weight": 0.0, "neighbour_weight": 0.0, "repeat_guard": False,
          "keep_titles": False}
# today's defaults, the defaults before issue 14, and the defaults without one lever each (leave one out)
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "before": BEFORE,
    "no_lexical": {"lexical_weight": 0.0},
    "no_answer_type": {"answer_type_weight": 0.0},
    "no_neighbour": {"neighbour_weight": 0.0},
    "no_titles": {"keep_titles": False},
    "no_repeat_guard": {"repeat_guard": False},
    "no_exact_repeats": {"exact_repeats": False},
    "partial_fit": {"partial_fit": True},
}
# what was tried on the tuning split (questions 0-149) to choose the defaults, each lever alone on top of
# the old defaults, then together: --variants tuning (results/levers_tune*.md)
TUNING: dict[str, dict] = {
    "before": BEFORE,
    **{f"lexical_{w}": {**BEFORE, "lexical_weight": w} for w in (0.03, 0.1, 0.2, 0.3, 0.5)},
    **{f"answer_type_{w}": {**BEFORE, "answer_type_weight": w} for w in (0.05, 0.1)},
    **{f"neighbour_{w}": {**BEFORE, "neighbour_weight": w} for w in (0.1, 0.2, 0.3)},
    "repeat_guard": {**BEFORE, "repeat_guard": True},
    "keep_titles": {**BEFORE, "keep_titles": True},
    "partial_fit": {**BEFORE, "partial_fit": True},
    "defaults": {},
}


def variant_engine(base, overrides: dict):
    """An engine that shares ``base``'s encoder, caches and tokenizer, with knobs overridden: those read per
    call (weights, switches, thresholds) and those of the per-chunk analysis (``max_segment_units``,
    ``tau``, ``max_span_units``, ``language``: a spec of its own, so the shared analysis memo keeps them apart)."""
    from semtoken_rag import SemTokenConfig
    from semtoken_rag.analysis import AnalysisSpec

    eng = copy.copy(base)
    eng.config = cfg = SemTokenConfig(**{**base.config.model_dump(), **overrides})
    old = base._spec
    eng._spec = AnalysisSpec(old.tokenizer, old.patterns, cfg.max_segment_units, old.max_segment_tokens, cfg.tau,
                             cfg.max_span_units, old.namespace, cfg.language)
    return eng


def paired(ref: list[int], other: list[int]) -> tuple[int, int, float]:
    """(+, −, p): questions only ``other`` keeps, only ``ref`` keeps, exact two-sided sign test."""
    from scipy.stats import binomtest

    plus = sum(o and not r for r, o in zip(ref, other))
    minus = sum(r and not o for r, o in zip(ref, other))
    return plus, minus, (binomtest(plus, plus + minus).pvalue if plus + minus else 1.0)


def run(records, variants: dict[str, dict], rates: list[float], log=print, cache_dir: str | None = None,
        dtype: str = "auto") -> dict:
    from semtoken_rag import SemToken, SemTokenConfig

    counter = TokenCounter("llama3")
    disk = {"cache_dir": cache_dir, "cache_max_disk_bytes": None} if cache_dir else {}
    base = SemToken(SemTokenConfig(**BASE, **disk, dtype=dtype))
    engines = {name: variant_engine(base, ov) for name, ov in variants.items()}
    out = {name: {str(r): {"hit": [], "tokens": [], "over": 0, "ms": []} for r in rates} for name in variants}
    cold_ms, t0 = [], time.perf_counter()
    for qi, rec in enumerate(records):
        total = counter.context_tokens(rec.chunks)
        for vi, (name, eng) in enumerate(engines.items()):
            for ri, rate in enumerate(rates):
                t = time.perf_counter()
                res = eng.compress(list(rec.chunks), rec.question, rate=rate)
                ms = (time.perf_counter() - t) * 1e3
                if vi == 0 and ri == 0:
                    cold_ms.append(ms)
                cell = out[name][str(rate)]
                cell["hit"].append(int(answer_in(rec.answers, join_context(res.texts))))
                tokens = counter.context_tokens(res.texts)
                cell["tokens"].append(tokens)
                cell["over"] += tokens > budget_for(total, rate)
                cell["ms"].append(ms)
        if (qi + 1) % 25 == 0:
            log(f"  {qi + 1}/{len(records)} questions, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"per_variant": out, "cold_ms_median": median(cold_ms)}


def tables(result: dict, ref: str) -> str:
    rates = result["config"]["rates"]
    pv = result["per_variant"]
    head = ["variant", "overrides"] + [f"recall @{r:.0%}" for r in rates] + [f"+/− vs {ref} @{r:.0%} (p)" for r in rates] \
        + ["over budget", "warm ms median"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cells in pv.items():
        ov = json.dumps(result["config"]["variants"][name]) if result["config"]["variants"][name] else "(defaults)"
        rec = [f"{mean(cells[str(r)]['hit']):.3f}" for r in rates]
        pm = []
        for r in rates:
            p, m, pval = paired(pv[ref][str(r)]["hit"], cells[str(r)]["hit"])
            pm.append("–" if name == ref else f"+{p}/−{m} ({pval:.2g})")
        over = sum(cells[str(r)]["over"] for r in rates)
        warm = median([ms for r in rates for ms in cells[str(r)]["ms"]][1:])
        rows.append("| " + " | ".join([name, ov, *rec, *pm, str(over), f"{warm:.1f}"]) + " |")
    return "\n".join(rows)


def cold_cost(records, variants: dict[str, dict], rate: float = 0.33, log=print) -> dict:
    """Cold calls of each variant, side by side: per question the variants take turns (the order rotating),
    each after clearing the fingerprint cache and query memo, so each pays the encoder pass. Returns the
    median ms per variant and each one's ratio to the first."""
    from semtoken_rag import SemToken, SemTokenConfig

    base = SemToken(SemTokenConfig(**BASE))
    engines = {name: variant_engine(base, ov) for name, ov in variants.items()}
    names = list(engines)
    ms: dict[str, list[float]] = {n: [] for n in names}
    base.compress(list(records[0].chunks), records[0].question, rate=rate)  # warm-up: weights, allocator
    for qi, rec in enumerate(records):
        for k in range(len(names)):
            name = names[(qi + k) % len(names)]
            base.clear_caches()
            t = time.perf_counter()
            engines[name].compress(list(rec.chunks), rec.question, rate=rate)
            ms[name].append((time.perf_counter() - t) * 1e3)
    med = {n: median(v) for n, v in ms.items()}
    out = {"rate": rate, "questions": len(records), "median_ms": med,
           "ratio_to_first": {n: med[n] / med[names[0]] for n in names}}
    log(json.dumps(out, indent=1))
    return out


def against_peers(levers: list[tuple[dict, str | None]], full: dict, variant: str = "defaults") -> str:
    """Recall of ``variant`` over the questions of the levers runs ``levers`` (e.g. the tuning and the
    held-out run: all 441 questions), beside every method of a full benchmark run (``results/full.json``)
    on the same questions, with the paired sign test (+: only the variant keeps the answer)."""
    hits: dict[str, dict[int, int]] = {}
    for run, name in levers:
        a, b = (int(x) for x in run["config"]["questions"].split("-"))
        for r, cell in run["per_variant"][name or variant].items():
            hits.setdefault(r, {}).update(zip(range(a, b + 1), cell["hit"]))
    rates = list(hits)
    head = ["method", "n"] + [f"recall @{float(r):.0%}" for r in rates] + [f"+/− @{float(r):.0%} (p)" for r in rates]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    qs = sorted(hits[rates[0]])
    rows.append("| " + " | ".join([f"semtoken-rag ({variant})", str(len(qs))]
                                  + [f"{mean([hits[r][q] for q in qs]):.3f}" for r in rates] + ["–"] * len(rates)) + " |")
    for name, per_q in full["per_question"].items():
        if name == "none":
            continue
        idx = {q: i for i, q in enumerate(per_q["question_index"])}
        both = [q for q in qs if q in idx]
        if not both or any(r not in per_q for r in rates):
            continue
        rec, pm = [], []
        for r in rates:
            other = [per_q[r]["hit"][idx[q]] for q in both]
            mine = [hits[r][q] for q in both]
            rec.append(f"{mean(other):.3f}")
            plus, minus, pval = paired(other, mine)
            pm.append(f"+{plus}/−{minus} ({pval:.2g})")
        label = full["methods"][name]["label"] + (" (committed run)" if name == "semtoken" else "")
        rows.append("| " + " | ".join([label, str(len(both)), *rec, *pm]) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.splitlines()[0])
    p.add_argument("--start", type=int, default=150)
    p.add_argument("--n", type=int, default=291)
    p.add_argument("--rates", nargs="+", type=float, default=[0.5, 0.33, 0.2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"default: {' '.join(VARIANTS)}; 'tuning' for the tuning set")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=JSON",
                   help="extra variants, e.g. 'mix={\"lexical_weight\": 0.3, \"neighbour_weight\": 0.1}'")
    p.add_argument("--ref", default="defaults")
    p.add_argument("--cache-dir", default=None, help="persist fingerprints here across runs (unbounded)")
    p.add_argument("--against", default=None, metavar="FULL_JSON",
                   help="no run: compare the 'defaults' variant of the --runs JSONs with every method of this "
                        "full benchmark run on the same questions, and print the table")
    p.add_argument("--runs", nargs="*", default=[], metavar="LEVERS_JSON[:VARIANT]")
    p.add_argument("--cost", action="store_true",
                   help="no recall run: cold-call cost of the variants side by side (first variant = 1.0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the encoder's precision for every variant (their fingerprints are cached apart)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--name", default="levers")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.against:
        runs = []
        for item in args.runs:  # FILE or FILE:VARIANT (the variant holding today's defaults in that run)
            f, _, name = item.partition(":")
            runs.append((json.loads(Path(f).read_text()), name or None))
        print(against_peers(runs, json.loads(Path(args.against).read_text())))
        return 0
    known = {**TUNING, **VARIANTS}
    names = [n for v in args.variants for n in (TUNING if v == "tuning" else [v])]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown variants {unknown}; known: tuning, {', '.join(known)}")
    variants = {n: known[n] for n in names}
    for item in args.set:
        name, _, spec = item.partition("=")
        variants[name] = json.loads(spec)
    if args.ref not in variants:
        p.error(f"--ref {args.ref!r} is not among the variants")
    records = load_nq(args.n, "random", args.data_dir, start=args.start)
    split = f"{records[0].index}-{records[-1].index}"
    if args.start < 150 <= args.start + args.n - 1:
        print("warning: this run mixes the tuning split (0-149) with held-out questions")
    print(f"questions {split}, {len(variants)} variants, rates {args.rates}", flush=True)
    if args.cost:
        cost = cold_cost(records, variants)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(
            {"name": args.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "machine": machine_info(), "questions": split, "variants": variants, **cost}, indent=1))
        return 0
    t0 = time.time()
    result = run(records, variants, args.rates, cache_dir=args.cache_dir, dtype=args.dtype)
    result = {"name": args.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m benchmarks.levers " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "machine": machine_info(), "wall_s": round(time.time() - t0, 1),
              "config": {"questions": split, "rates": args.rates, "variants": variants, "ref": args.ref,
                         "dtype": args.dtype,
                         "gold_position": "random.Random(1234 + question_index).randrange(20)",
                         "budget_rule": "floor(rate * sum of chunk Llama 3 tokens)"},
              **result}
    md = (f"# {args.name}: recall levers on NQ questions {split}\n\n`{result['command']}`\n\n"
          f"{result['date']}, {result['wall_s']} s; cold call median {result['cold_ms_median']:.0f} ms "
          f"(first variant, first budget); warm ms = the variant's calls on cached fingerprints.\n\n"
          f"{tables(result, args.ref)}\n")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
