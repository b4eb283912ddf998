"""Serving cost of semtoken-rag on one device (CUDA or CPU): the figures of issue 10.

    python -m benchmarks.gpu [--device cuda|cpu] [--n 291] [--encoder PATH] [--data DIR] [--dtype auto] [--name gpu]

On NQ questions 150-440 (the held-out part; 20 passages each) it measures the encoder forward alone,
a cold and a warm ``compress`` (median, p95), ``compress_many`` throughput at 1/8/64/256 queries a
call with all chunks new and all cached, 32 concurrent ``acompress`` calls, fingerprinting tokens/s at
batch 32/128/512 (8/16/32/128 on CPU), answer recall at rates 0.5/0.33/0.2 (answer in the kept context)
with the budget checked, where a cold and a warm call's time goes stage by stage (``benchmarks.stages``;
on CUDA beside the same warm calls by an engine on the host's CPU), the same calls with the host's thread
pools held to one thread (``benchmarks.stages.host_threads``), cold calls with a ``cache_dir`` written behind
the call against in it, and, when the encoder runs below
float32 (float16 on CUDA by default, bfloat16 on a CPU with AMX or AVX-512 BF16), the agreement of its kept contexts with float32's. Writes
``benchmarks/results/<name>.json`` and ``<name>.md`` with the device, torch and CUDA versions, the
date, the command and the load average.

Only ``semtoken_rag`` and its core dependencies are imported (no tiktoken, langchain or llama-index),
so it runs on a bare CUDA image with the carried wheels.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import NQ_FILE, answer_in, load_nq
from semtoken_rag.encoder import cpu_bf16_units

from . import stages as _stages

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_HELD_OUT = 150
RATES = (0.5, 0.33, 0.2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="torch device (default: CUDA when present, else CPU)")
    ap.add_argument("--n", type=int, default=291, help="questions from 150 on (default 291: 150-440)")
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2", help="encoder name or folder (GPU box: .gpu/model)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="folder holding the NQ file (default ../shared/data; GPU box: .gpu/data)")
    ap.add_argument("--rate", type=float, default=0.33, help="rate of the latency and throughput runs")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="encoder precision (default auto: float16 on CUDA; bfloat16 on a CPU with AMX or AVX-512 BF16, else float32)")
    ap.add_argument("--fp32-n", type=int, default=60,
                    help="questions for the agreement with float32 (when the encoder runs below it)")
    ap.add_argument("--name", default="gpu", help="results file stem (e.g. gpu_cpu for the CPU run)")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 291:
        ap.error(f"--n must be in 1..291 (questions 150-440), got {args.n}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, *a, **kw):
    _sync(device)
    t = time.perf_counter()
    out = fn(*a, **kw)
    _sync(device)
    return out, time.perf_counter() - t


def _stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def _windows(engine: SemToken, chunks: list[str]) -> list[list[int]]:
    enc = engine.encoder
    ids = enc.tokenizer(chunks, add_special_tokens=False)["input_ids"]
    return [s[a:b] for s in ids for a, b, _, _ in enc._windows(len(s))]


def _forward_alone(engine: SemToken, chunks: list[str]) -> float:
    """Seconds of the encoder forward over the windows of ``chunks`` (tokenized beforehand)."""
    return engine.encoder.forward_seconds(chunks)


def _clear(engine: SemToken) -> None:
    clear = getattr(engine, "clear_caches", None)
    if callable(clear):
        clear()
    else:
        engine.cache.clear()
        engine.preparer.clear_queries()


def latency(engine: SemToken, qs, rate: float) -> dict:
    dev = engine.encoder.device
    floor, cold, warm = [], [], []
    for q in qs:
        for _ in range(2):  # two pairs per question, each forward right before its cold call (the machine's
            # speed drifts: a ratio of two timings taken apart is noisier than the host's part of a call)
            floor.append(_forward_alone(engine, list(q.chunks)))
            _clear(engine)
            cold.append(_timed(dev, engine.compress, list(q.chunks), q.question, rate=rate)[1])
            warm.append(_timed(dev, engine.compress, list(q.chunks), q.question, rate=rate)[1])
    out = {"forward": _stats(floor), "cold": _stats(cold), "warm": _stats(warm),
           "cold_over_forward": float(statistics.median(c / f for c, f in zip(cold, floor))),
           "warm_over_cold": float(statistics.median(w / c for w, c in zip(warm, cold)))}
    return out


def stages(engine: SemToken, qs, rate: float, n: int = 40) -> dict:
    """Where a cold and a warm call's time goes (:mod:`benchmarks.stages`), on the first ``n`` questions;
    on CUDA also the same warm calls by an engine on this host's CPU (its encoder in float32), which tells
    the host's own speed at the host work apart from what the device path adds to it."""
    out = _stages.breakdown(engine, qs[:n], rate, lambda: _clear(engine))
    if engine.encoder.device.type == "cuda":
        out["cpu_engine_warm"] = _stages.host_reference(
            lambda: SemToken(engine.config.model_copy(update={"device": "cpu", "dtype": "float32"})), qs[:n], rate)
    return out


def host_threads(engine: SemToken, qs, rate: float, n: int = 40) -> dict:
    """Calls with the host's thread pools as they are against held to one thread (:mod:`benchmarks.stages`),
    side by side on the first ``n`` questions: whether many cores slow the host work's small steps."""
    return _stages.host_threads(engine, qs[:n], rate, lambda: _clear(engine))


def store_writes(engine: SemToken, qs, rate: float, n: int = 40) -> dict:
    """Cold calls with a ``cache_dir``, its writes on a worker thread (``store_write_behind=True``) against
    in the call, side by side (alternating which goes first) on the first ``n`` questions: what a store's
    write adds to a call here, and whether writing behind takes it off."""
    import tempfile

    seconds: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="semtoken-bench-") as root:
        engines = {behind: SemToken(engine.config.model_copy(update={
            "cache_dir": Path(root) / str(behind), "store_write_behind": behind})) for behind in (True, False)}
        for e in engines.values():  # (one-off costs: the store's directory, the worker thread)
            e.compress(list(qs[-1].chunks), qs[-1].question, rate=rate)
        dev = engine.encoder.device
        for k, q in enumerate(qs[:n]):
            for behind in (True, False) if k % 2 else (False, True):
                e = engines[behind]
                e.cache.flush()  # (the previous call's write is not this one's)
                e.clear_caches(disk=True)
                seconds[behind].append(_timed(dev, e.compress, list(q.chunks), q.question, rate=rate)[1])
        for e in engines.values():
            e.close()
    return {"questions": len(seconds[True]), "behind_ms": 1000 * statistics.median(seconds[True]),
            "in_call_ms": 1000 * statistics.median(seconds[False]),
            "ratio": statistics.median(a / b for a, b in zip(seconds[True], seconds[False]))}


def throughput(engine: SemToken, qs, rate: float, sizes=(1, 8, 64, 256)) -> dict:
    """compress_many at each batch size over as many whole batches as the questions allow."""
    dev = engine.encoder.device
    out = {}
    for b in sizes:
        groups = [qs[i:i + b] for i in range(0, len(qs) - b + 1, b)][: max(1, 64 // b)]
        if not groups:
            continue
        new, cached = [], []
        for g in groups:
            lists, queries = [list(q.chunks) for q in g], [q.question for q in g]
            _clear(engine)
            new.append(_timed(dev, engine.compress_many, lists, queries, rate=rate)[1])
            cached.append(_timed(dev, engine.compress_many, lists, queries, rate=rate)[1])
        done = b * len(groups)
        out[str(b)] = {"calls": len(groups), "new_qps": done / sum(new), "cached_qps": done / sum(cached),
                       "new_ms_per_call": float(np.median(new)) * 1000,
                       "cached_ms_per_call": float(np.median(cached)) * 1000}
    # the CPU figure to reach: compress_many of 8 queries faster than 8 single cold calls (side by side,
    # alternating, 3 rounds over different questions: the median of the rounds' ratios)
    ratios = []
    for r in range(3):
        group = qs[8 * r:8 * r + 8]
        if len(group) < 8:
            break
        singles = 0.0
        for q in group:
            _clear(engine)
            singles += _timed(dev, engine.compress, list(q.chunks), q.question, rate=rate)[1]
        _clear(engine)
        many = _timed(dev, engine.compress_many, [list(q.chunks) for q in group],
                      [q.question for q in group], rate=rate)[1]
        ratios.append(many / singles)
    if ratios:
        out["many8_over_8_singles"] = float(np.median(ratios))
        out["many8_over_8_singles_rounds"] = ratios
    return out


def concurrent(engine: SemToken, qs, rate: float, k: int = 32) -> dict:
    """k concurrent acompress calls on new chunks, against the same k calls one after another."""
    group = qs[:k]

    async def together():
        return await asyncio.gather(*(engine.acompress(list(q.chunks), q.question, rate=rate) for q in group))

    _clear(engine)
    dev = engine.encoder.device
    calls_before = engine.encoder.forward_calls
    results, wall = _timed(dev, asyncio.run, together())
    passes = engine.encoder.forward_calls - calls_before
    _clear(engine)
    seq = sum(_timed(dev, engine.compress, list(q.chunks), q.question, rate=rate)[1] for q in group)
    same = [r.texts for r in results] == [engine.compress(list(q.chunks), q.question, rate=rate).texts
                                          for q in group]
    return {"calls": len(group), "wall_ms": wall * 1000, "qps": len(group) / wall,
            "sequential_ms": seq * 1000, "encoder_batches": passes, "equal_to_sequential": same}


def fingerprinting(engine: SemToken, qs, sizes=(32, 128, 512)) -> dict:
    enc = engine.encoder
    texts = [c for q in qs for c in q.chunks]
    tokens = sum(len(s) for s in _windows(engine, texts))
    seqs = _windows(engine, texts)
    old = enc.batch_size
    out = {"passages": len(texts), "tokens": tokens}
    try:
        for b in sizes:
            enc.batch_size = b
            enc.fingerprint(texts[:64])  # warm the allocator at this batch size
            fp = _timed(enc.device, enc.fingerprint, texts)[1]
            fw = _timed(enc.device, enc._forward, seqs)[1]
            out[str(b)] = {"fingerprint_tokens_per_s": tokens / fp, "forward_tokens_per_s": tokens / fw}
    finally:
        enc.batch_size = old
    return out


def recall(engine: SemToken, qs) -> dict:
    out = {}
    for rate in RATES:
        hits, over, kept, orig = 0, 0, 0, 0
        for q in qs:
            res = engine.compress(list(q.chunks), q.question, rate=rate)
            hits += answer_in(q.answers, "\n".join(res.texts))
            over += (res.compressed_tokens + getattr(res, "overhead_tokens", 0)) > res.budget
            kept += res.compressed_tokens
            orig += res.original_tokens
        out[str(rate)] = {"recall": hits / len(qs), "kept_fraction": kept / orig, "over_budget_calls": over}
    return out


def precision_agreement(engine: SemToken, args, qs, rate: float) -> dict | None:
    if engine.encoder.dtype == torch.float32:
        return None
    other = SemToken(engine.config.model_copy(update={"dtype": "float32"}))
    same = sum(engine.compress(list(q.chunks), q.question, rate=rate).texts
               == other.compress(list(q.chunks), q.question, rate=rate).texts for q in qs)
    return {"questions": len(qs), "identical_contexts": int(same)}


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def environment(engine: SemToken) -> dict:
    dev = engine.encoder.device
    return {"device": str(dev), "device_name": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "encoder": engine.config.encoder, "dtype": str(engine.encoder.dtype),
            "cpu_bf16_units": cpu_bf16_units() if dev.type == "cpu" else None,
            "batch_size": engine.encoder.batch_size,
            "repeat_search": getattr(engine, "repeat_search", "faiss-cpu"),
            "batch_window_ms": getattr(engine.config, "batch_window_ms", None),
            "cuda_graphs": getattr(engine.encoder, "graphs", None) is not None,
            "cache_max_bytes": engine.config.cache_max_bytes,
            "analysis_memo_max_bytes": engine.config.analysis_memo_max_bytes,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m benchmarks.gpu " + shlex.join(sys.argv[1:])}


def markdown(r: dict) -> str:
    e, lat = r["env"], r["latency"]
    lines = [f"# semtoken-rag serving cost on {e['device_name']} ({e['device']})", "",
             (f"{e['date']}; torch {e['torch']}, CUDA {e['cuda']}; encoder {e['encoder']} ({e['dtype']}"
             + (f", CPU bfloat16 units {e['cpu_bf16_units']}" if e.get("cpu_bf16_units") else "") + "), "
             f"batch size {e['batch_size']}, repeat search {e['repeat_search']}, "
             f"batch window {e['batch_window_ms']} ms, CUDA graphs {e.get('cuda_graphs', False)}; fingerprint "
             f"cache {e.get('cache_max_bytes', 256 << 20) >> 20} MiB and analysis memo "
             f"{e.get('analysis_memo_max_bytes', 64 << 20) >> 20} MiB (they hold the 5,120 chunks of the largest "
             f"`compress_many` call); {e['torch_threads']} torch threads on {e['cpus']} CPUs, "
             f"load average {e['load_average']} at the end (over the CPU count means other jobs shared "
             "the machine)."), "", f"Command: `{e['command']}`", "",
             (f"NQ questions {FIRST_HELD_OUT}-{FIRST_HELD_OUT + r['n'] - 1}, 20 passages each, rate "
             f"{r['rate']}."), "", "| one call | median ms | p95 ms |", "| --- | --- | --- |"]
    for k, label in (("forward", "encoder forward alone (20 passages)"), ("cold", "cold `compress`"),
                     ("warm", "warm `compress` (cached chunks)")):
        lines.append(f"| {label} | {lat[k]['median_ms']:.1f} | {lat[k]['p95_ms']:.1f} |")
    lines += ["", f"cold / forward: {lat['cold_over_forward']:.2f}; warm / cold: {lat['warm_over_cold']:.3f}"]
    b = r.get("stages")
    if b:
        lines += ["", (f"Where a call's time goes (medians over questions {FIRST_HELD_OUT}-"
                       f"{FIRST_HELD_OUT + b['questions'] - 1}, one cold and one warm call each; a stage's "
                       "median, so the rows need not add up to the call's):"), "", *_stages.markdown_rows(b)]
        ref = b.get("cpu_engine_warm")
        if ref:
            lines += ["", (f"The same warm calls by an engine on this machine's CPU: {ref['warm_ms']:.2f} ms "
                           f"(against {b['warm']['total']:.2f} ms on {e['device']}): what the host itself takes "
                           "for the host work.")]
    t = r.get("host_threads")
    if t:
        lines += ["", (f"Host thread pools ({', '.join(t['limited'])}) as they are, against held to one thread, "
                       f"side by side on {t['questions']} questions: "
                       + "; ".join(f"{kind} {t[kind]['default']:.2f} against {t[kind]['one_thread']:.2f} ms "
                                   f"(one thread / as they are: {t[kind]['ratio']:.2f})"
                                   for kind in ("warm", "cold") if kind in t) + ".")]
    w = r.get("store_writes")
    if w:
        lines += ["", (f"Cold calls with a `cache_dir`, its writes behind the call against in it, side by side on "
                       f"{w['questions']} questions: {w['behind_ms']:.1f} against {w['in_call_ms']:.1f} ms "
                       f"(behind / in the call: {w['ratio']:.3f}).")]
    lines += ["", "| `compress_many` queries a call | calls | queries/s, chunks new | queries/s, cached |",
              "| --- | --- | --- | --- |"]
    for b, t in r["throughput"].items():
        if isinstance(t, dict):
            lines.append(f"| {b} | {t['calls']} | {t['new_qps']:.1f} | {t['cached_qps']:.1f} |")
    if "many8_over_8_singles" in r["throughput"]:
        rounds = r["throughput"].get("many8_over_8_singles_rounds", [])
        lines += ["", (f"`compress_many` of 8 queries / 8 single cold calls: "
                      f"{r['throughput']['many8_over_8_singles']:.2f} (median of "
                      f"{', '.join(f'{x:.2f}' for x in rounds)}: rounds side by side on other questions)")]
    c = r["concurrent"]
    lines += ["", (f"{c['calls']} concurrent `acompress` (new chunks): {c['wall_ms']:.0f} ms wall, "
                  f"{c['qps']:.1f} queries/s, {c['encoder_batches']} encoder batches; the same calls one after "
                  f"another: {c['sequential_ms']:.0f} ms; results equal to sequential calls: "
                  f"{c['equal_to_sequential']}"), "",
              f"Fingerprinting {r['fingerprint']['passages']} passages ({r['fingerprint']['tokens']} tokens):", "",
              "| batch | `Encoder.fingerprint` tokens/s | raw forward tokens/s |", "| --- | --- | --- |"]
    for b, f in r["fingerprint"].items():
        if isinstance(f, dict):
            lines.append(f"| {b} | {f['fingerprint_tokens_per_s']:,.0f} | {f['forward_tokens_per_s']:,.0f} |")
    lines += ["", "| rate | recall (answer in kept context) | tokens kept | calls over budget |",
              "| --- | --- | --- | --- |"]
    for rate, x in r["recall"].items():
        lines.append(f"| {rate} | {x['recall']:.3f} | {x['kept_fraction']:.3f} | {x['over_budget_calls']} |")
    p = r.get("fp16_vs_fp32")
    low = r["env"]["dtype"].replace("torch.", "")
    lines += ["", f"{low} vs float32: identical kept contexts in {p['identical_contexts']} of {p['questions']} "
                  "questions" if p else "precision: float32 (no agreement to measure)",
              "", f"Whole run: {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    path = Path(args.data) / NQ_FILE
    if not path.is_file():
        raise SystemExit(f"NQ file not found: {path} (pass --data DIR)")
    qs, warmup = load_nq(args.n, path, start=FIRST_HELD_OUT), load_nq(3, path)
    # memory bounds that hold the largest compress_many call's 5,120 chunks (256 queries x 20), so that its
    # second, "cached" run finds them all; at the defaults (256 MiB of fingerprints, 64 MiB of analyses:
    # about 3,000 and 2,200 NQ chunks) it would re-encode and re-analyse the evicted ones
    engine = SemToken(SemTokenConfig(encoder=args.encoder, device=args.device, dtype=args.dtype, cache_max_bytes=1 << 30,
                                     analysis_memo_max_bytes=512 << 20))
    for q in warmup:  # one-off allocation and kernel selection costs
        engine.compress(list(q.chunks), q.question, rate=args.rate)
    r: dict = {"n": len(qs), "rate": args.rate}
    # (the breakdown first: its questions' words are new to the process-wide word memos, as in a first call)
    steps = [("stages", lambda: stages(engine, qs, args.rate)),
             ("host_threads", lambda: host_threads(engine, qs, args.rate)),
             ("store_writes", lambda: store_writes(engine, qs, args.rate)),
             ("latency", lambda: latency(engine, qs, args.rate)),
             ("throughput", lambda: throughput(engine, qs, args.rate)),
             ("concurrent", lambda: concurrent(engine, qs, args.rate)),
             ("fingerprint", lambda: fingerprinting(engine, qs, (32, 128, 512) if engine.encoder.device.type == "cuda"
                                                     else (8, 16, 32, 128))),
             ("recall", lambda: recall(engine, qs)),
             ("fp16_vs_fp32", lambda: precision_agreement(engine, args, qs[:args.fp32_n], args.rate))]
    for key, step in steps:
        t = time.perf_counter()
        r[key] = step()
        print(f"{key}: {time.perf_counter() - t:.1f} s  {json.dumps(r[key], default=str)[:300]}", flush=True)
    r["env"] = environment(engine)
    r["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(r))
    print(markdown(r))
    return r


if __name__ == "__main__":
    main()
