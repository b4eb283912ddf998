"""Markdown tables from a results dict (the JSON the CLI writes).

    python -m benchmarks.report benchmarks/results/full.json --start 150      # its questions 150-440 only

The command re-renders a committed results file over a range of its questions, from the per-question
arrays it holds (hits, tokens, budgets, latencies): a run that covered the tuning split too reports its
held-out part on its own. Setup time, peak memory and encoder tokens/s are the whole run's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

from .metrics import mean, median, percentile


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x * 1000:.0f}" if x >= 0.0095 else f"{x * 1000:.2g}"


def _num(x, fmt="{:.0f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def quality_table(results: dict, names: list[str] | None = None) -> str:
    budgets = [str(b) for b in results["config"]["budgets"]]
    head = ["method", "n"] + [f"recall @{float(b):.0%}" for b in budgets] + \
        [f"kept @{float(b):.0%}" for b in budgets] + ["over budget (" + "/".join(f"{float(b):.0%}" for b in budgets) + ")"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        if names is not None and name not in names:
            continue
        bb = m["budgets"]
        cells = [m["label"], str(m["n_questions"])]
        cells += [_pct(bb[b]["recall"]) if b in bb else "–" for b in budgets]
        cells += [_pct(bb[b]["achieved_ratio_mean"]) if b in bb else "–" for b in budgets]
        cells.append("/".join(str(bb[b]["over_budget"]) if b in bb else "–" for b in budgets))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cost_table(results: dict, names: list[str] | None = None) -> str:
    head = ["method", "cold median ms", "cold p95 ms", "warm median ms", "warm p95 ms", "encoder tok/s",
            "setup s", "peak RSS MB (before setup)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        if names is not None and name not in names:
            continue
        lat, mem = m["latency"], m["memory"]
        rows.append("| " + " | ".join([
            m["label"], _ms(lat["cold_median_s"]), _ms(lat["cold_p95_s"]), _ms(lat["warm_median_s"]),
            _ms(lat["warm_p95_s"]), _num(m["encoder_tokens_per_s"]), _num(m["setup_s"], "{:.1f}"),
            f"{_num(mem['rss_peak_mb'])} ({_num(mem['rss_baseline_mb'])})"]) + " |")
    return "\n".join(rows)


def positions_table(results: dict) -> str:
    pos = results.get("positions")
    if not pos:
        return ""
    cols = pos["positions"]
    head = ["method"] + [f"gold {c}" for c in cols]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_pos in pos["recall"].items():
        rows.append("| " + " | ".join([pos["labels"].get(name, name)] + [_pct(by_pos.get(c)) for c in cols]) + " |")
    return "\n".join(rows)


def paired_table(results: dict, ref: str = "semtoken") -> str:
    """Per budget, against each other method: questions only ``ref`` keeps the answer of (+), questions only
    the other method keeps (−), and the two-sided exact sign-test p-value on those discordant questions
    (scipy's binomial test, p = 0.5). Only questions both methods ran on are paired."""
    from scipy.stats import binomtest

    per_q = results.get("per_question") or {}
    if ref not in per_q:
        return ""
    budgets = [str(b) for b in results["config"]["budgets"]]
    head = ["method"] + [f"+/− @{float(b):.0%} (p)" for b in budgets]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    r = per_q[ref]
    ri = {q: i for i, q in enumerate(r["question_index"])}
    for name, other in per_q.items():
        if name in (ref, "none"):
            continue
        both = sorted(set(r["question_index"]) & set(other["question_index"]))
        if not both:
            continue
        oi = {q: i for i, q in enumerate(other["question_index"])}
        cells = [f"{results['methods'][name]['label']} (n={len(both)})"]
        for b in budgets:
            if b not in r or b not in other:
                cells.append("–")
                continue
            a = [bool(r[b]["hit"][ri[q]]) for q in both]
            o = [bool(other[b]["hit"][oi[q]]) for q in both]
            wins = sum(x and not y for x, y in zip(a, o))
            losses = sum(y and not x for x, y in zip(a, o))
            p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
            cells.append(f"+{wins}/−{losses} ({p:.2g})")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def e2e_table(results: dict) -> str:
    e2e = results.get("e2e")
    if not e2e:
        return ""
    head = ["context", "n", "accuracy", "prefill median ms", "prefill vs full", "prompt tokens", "KV cache MB"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = e2e["contexts"].get("full context", {}).get("prefill_mean_s")
    for name, r in e2e["contexts"].items():
        rel = f"{r['prefill_mean_s'] / full:.2f}" if full else "–"
        rows.append("| " + " | ".join([name, str(r["n"]), _pct(r["accuracy"]), _ms(r["prefill_median_s"]), rel,
                                       _num(r["prompt_tokens_mean"]), _num(r["kv_bytes_mean"] / 2**20, "{:.1f}")])
                    + " |")
    return "\n".join(rows)


def markdown(results: dict) -> str:
    cfg, mach = results["config"], results["machine"]
    out = [f"# semtoken-rag benchmark: {results['name']}", "",
           f"- date: {results['date']}",
           (f"- machine: {mach['platform']}, {mach['cpu_count']} CPUs ({mach.get('processor') or 'unknown CPU'}), "
           f"torch threads {mach.get('torch_threads')}, load average at start {mach.get('loadavg_start')}, "
           f"at end {mach.get('loadavg_end')} (the load average counts this run's own threads; more than "
           "that means other work shared the CPUs and timings are noisier)"),
           f"- command: `{results['command']}`",
           (f"- data: {cfg['data_file']}, {_questions(cfg)}, gold passage at "
           f"`{cfg.get('gold_position', 'random.Random(1234 + i).randrange(20)')}`; chunk = title + newline + "
           f"text; device {cfg.get('device', 'cpu for MiniLM peers, auto for semtoken-rag')}"),
           (f"- budgets in {cfg['budget_tokenizer']} tokens (quicktok): floor(rate x original); tokens of a context "
           "= sum over kept pieces; \"kept\" = mean achieved ratio; over budget = questions above the budget"),
           "- recall: a normalized gold answer (SQuAD normalisation) is a substring of the normalized context",
           ""]
    if results.get("restricted"):
        out.insert(-1, f"- {results['restricted']}")
    out += ["## Answer recall and budget", "", quality_table(results), ""]
    subset = results.get("subset_comparison")
    if subset:
        out.append(f"Methods marked with a smaller n ran on the first {subset['n']} questions only; on those "
                   "questions: " + "; ".join(f"{k} " + "/".join(_pct(v[b]) for b in v) for k, v in
                                             subset["recall"].items()) + " (recall at "
                   + "/".join(f"{float(b):.0%}" for b in results["config"]["budgets"]) + ").")
        out.append("")
    paired = paired_table(results)
    if paired:
        out += ["## Paired against semtoken-rag", "",
                ("Questions whose answer only semtoken-rag keeps (+) and only the other method keeps (−), per "
                 "budget; p = two-sided exact sign test on those questions. Over-budget outputs count as they "
                 "are (see the budget columns above)."), "", paired, ""]
    out += ["## Cost per question", "", cost_table(results), "",
            ("Latency is per question and budget (one call); methods with a cache (semtoken): cold = first call "
            "for a question after clearing the cache, warm = calls on the same chunks again. Peers that score "
            "independently of the budget are timed as scoring + selection for each budget. Encoder tok/s = "
            "encoder (word-piece) tokens processed / cold latency. "
            f"Memory: {results.get('memory_note', '')}"), ""]
    ref = results.get("reference")
    if ref and ref.get("minilm_pass_median_s"):
        rel = ref["relative_cold_median"]
        out += [f"One MiniLM pass over query + 20 passages (rerank's scoring): median "
                f"{ref['minilm_pass_median_s'] * 1000:.0f} ms. Cold median in MiniLM passes: "
                + ", ".join(f"{results['methods'][k]['label']} {v:.2f}" for k, v in rel.items()
                            if k not in ("none", "truncation", "length_only")) + ".", ""]
    if results.get("positions"):
        pb = results["positions"]["budget"]
        out += [(f"## Lost in the middle: recall at {float(pb):.0%} by gold position "
                f"({_questions(results['positions'])})"), "", positions_table(results), ""]
    if results.get("e2e"):
        e = results["e2e"]
        out += [f"## End to end: SmolLM2-135M-Instruct reader, contexts at {float(e['budget']):.0%}", "",
                e2e_table(results), "",
                ("Accuracy = best-subspan match of a gold answer in the first output line (greedy, max "
                f"{e['max_new_tokens']} new tokens). Prefill = one forward pass over the chat-formatted prompt "
                "(fp32, CPU); KV cache = bytes of key/value tensors in the returned past_key_values. "
                "'gold passage only' uses the gold label and is a reference, not a method."), ""]
    out += ["## Methods", ""]
    for name, m in results["methods"].items():
        out.append(f"- **{m['label']}** (`{name}`): {m['description']}")
    if results.get("skipped"):
        out += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(out) + "\n"


def _questions(part: dict) -> str:
    """'questions 150-249' when the results say which, else (older results) 'first N questions'."""
    if not part.get("questions"):
        return f"first {part['n']} questions"
    return "questions " + str(part["questions"]).removeprefix("questions ")  # a draft wrote the word too


def restrict(results: dict, start: int, stop: int | None = None) -> dict:
    """``results`` with every method's summary recomputed over questions ``start <= i < stop`` only.

    Recall, kept ratio, over-budget counts and latencies come from the per-question arrays. A method with
    a cache (it has warm latencies) is cold at its first budget, as the runner times it, and warm at the
    other budgets (the runner's repeat of the first call is not stored per question). Positions and e2e,
    which ran on their own questions, are dropped.
    """
    per_q = results.get("per_question") or {}
    if not per_q:
        raise ValueError("these results hold no per-question arrays to restrict")
    out = copy.deepcopy(results)
    out.pop("positions", None)
    out.pop("e2e", None)
    out.pop("subset_comparison", None)
    out.pop("reference", None)  # the MiniLM pass was timed over the whole run
    budgets = [str(b) for b in results["config"]["budgets"]]
    chosen_all: set[int] = set()
    for name, q in per_q.items():
        keep = [i for i, qi in enumerate(q["question_index"]) if qi >= start and (stop is None or qi < stop)]
        chosen_all.update(q["question_index"][i] for i in keep)
        m = out["methods"][name]
        m["n_questions"] = len(keep)
        original = [q["original_tokens"][i] for i in keep]
        for b in budgets:
            if b not in q:
                continue
            hit = [q[b]["hit"][i] for i in keep]
            toks = [q[b]["tokens"][i] for i in keep]
            buds = [q[b]["budget"][i] for i in keep]
            over = [(t - u) / u for t, u in zip(toks, buds) if t > u]
            m["budgets"][b].update({
                "n": len(keep), "recall": mean(hit), "hits": int(sum(hit)),
                "achieved_ratio_mean": mean([t / o for t, o in zip(toks, original) if o]),
                "achieved_ratio_total": sum(toks) / max(1, sum(original)),
                "tokens_mean": mean(toks), "over_budget": len(over),
                "over_budget_excess_mean": mean(over) if over else 0.0,
                "latency_median_s": median([q[b]["latency_s"][i] for i in keep]),
                "latency_p95_s": percentile([q[b]["latency_s"][i] for i in keep], 95)})
        lat = m["latency"]
        if lat.get("warm_n"):
            cold = [q[budgets[0]]["latency_s"][i] for i in keep]
            warm = [q[b]["latency_s"][i] for b in budgets[1:] for i in keep]
        else:
            cold, warm = [q[b]["latency_s"][i] for b in budgets for i in keep], []
        lat.update({"cold_median_s": median(cold), "cold_p95_s": percentile(cold, 95), "cold_n": len(cold),
                    "warm_median_s": median(warm) if warm else None,
                    "warm_p95_s": percentile(warm, 95) if warm else None, "warm_n": len(warm)})
        q_out = out["per_question"][name]
        q_out["question_index"] = [q["question_index"][i] for i in keep]
        q_out["original_tokens"] = original
        for b in budgets:
            if b in q:
                q_out[b] = {k: [v[i] for i in keep] for k, v in q[b].items()}
    if not chosen_all:
        raise ValueError(f"no questions in {start}-{'' if stop is None else stop - 1} in these results")
    lo, hi = min(chosen_all), max(chosen_all)
    out["config"]["questions"] = f"{lo}-{hi}"
    out["config"]["n"] = len(chosen_all)
    out["name"] = f"{results['name']} (questions {lo}-{hi})"
    out["restricted"] = (f"re-rendered over questions {lo}-{hi} from the run's per-question arrays (`python -m "
                         f"benchmarks.report`): a cached method's warm calls are those at the other budgets; setup, "
                         f"memory and encoder tok/s are the whole run's")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results JSON written by python -m benchmarks")
    ap.add_argument("--start", type=int, default=150, help="first question (default 150: the held-out split)")
    ap.add_argument("--stop", type=int, default=None, help="one past the last question (default: all)")
    ap.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    try:
        restricted = restrict(json.loads(Path(args.results).read_text()), args.start, args.stop)
    except (OSError, ValueError, KeyError) as e:
        print(f"[bench] error: {args.results}: {e}", file=sys.stderr)
        return 2
    text = markdown(restricted)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
