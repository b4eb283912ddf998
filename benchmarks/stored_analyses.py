"""A replica's first call on pre-warmed chunks, with each chunk's analysis kept in its entry against
fingerprints alone (``SemTokenConfig(prewarm_analyses=...)``), side by side in one process.

Two ``cache_dir`` stores are pre-warmed with the passages of NQ questions from 150 on, one each way. Then,
for each question, one engine per store compresses its 20 passages with everything in memory cleared
first (a new replica's first call on them: fingerprints from the store, the query new), the two taking
turns going first. Last, the store of fingerprints alone is pre-warmed again with analyses on (they are
added from the stored fingerprints), then once more (all stored). Needs the NQ file (``--data``)::

    python -m benchmarks.stored_analyses --n 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import load_nq

from .data import main_guard, nq_source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stored_analyses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--n", type=int, default=40, help="questions from 150 on")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    source = nq_source(args.data)
    qs = load_nq(args.n, source, start=150)
    texts = list(dict.fromkeys(c for q in qs for c in q.chunks))
    out: dict = {"n": len(qs), "passages": len(texts), "prewarm_s": {}, "first_call_ms": {}, "reprewarm": {}}
    with tempfile.TemporaryDirectory() as root:
        engines = {}
        for kept in (True, False):
            engine = SemToken(SemTokenConfig(device=args.device, cache_dir=Path(root) / str(kept),
                                             prewarm_analyses=kept))
            for q in load_nq(3, source):  # warm-up (questions 0-2)
                engine.compress(list(q.chunks), q.question, rate=0.33)
            started = time.perf_counter()
            engine.prewarm(texts)
            out["prewarm_s"][str(kept)] = time.perf_counter() - started
            engines[kept] = engine
        calls: dict[bool, list[float]] = {True: [], False: []}
        for i, q in enumerate(qs):
            for kept in (True, False) if i % 2 == 0 else (False, True):
                engines[kept].clear_caches()  # memory only: the store on disk stays
                started = time.perf_counter()
                engines[kept].compress(list(q.chunks), q.question, rate=0.33)
                calls[kept].append(time.perf_counter() - started)
        # a store pre-warmed with fingerprints alone (an older version's, or --no-analyses) given its analyses by
        # a later pre-warm, from its stored fingerprints, against pre-warming it from scratch (above); and a
        # pre-warm that finds everything stored (each entry's first bytes read)
        refresh = SemToken(engines[True].config.model_copy(update={"cache_dir": Path(root) / "False"}))
        for name, engine in (("add analyses to a store of fingerprints alone", refresh),
                             ("all stored, analyses included", refresh)):
            engine.clear_caches()
            started = time.perf_counter()
            encoded, analysed = engine._prewarm(texts, 256)
            out["reprewarm"][name] = {"seconds": time.perf_counter() - started, "encoded": encoded,
                                      "analysed": analysed}
        for e in (*engines.values(), refresh):
            e.close()
    out["first_call_ms"] = {("with analyses" if k else "fingerprints alone"): 1000 * statistics.median(v)
                            for k, v in calls.items()}
    out["ratio"] = statistics.median(a / b for a, b in zip(calls[True], calls[False]))
    out["prewarm_passages_per_s"] = {("with analyses" if k == "True" else "fingerprints alone"): len(texts) / s
                                     for k, s in out["prewarm_s"].items()}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
