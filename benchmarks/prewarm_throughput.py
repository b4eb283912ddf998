"""Pre-warm throughput in process (issue 12 (b) on a GPU box, where Redis and Ray are not installed):
``engine.prewarm`` over every NQ passage into the memory store, beside the raw encoder forward over the
same passages and the same pre-warm without each chunk's analysis in its entry (``prewarm_analyses=False``,
at 256 texts a step). Median of 3 rounds after a warm-up, each round timing every ``--batch-sizes`` value (texts
encoded and stored per ``prewarm`` step) in turn. Needs the NQ file (``--data``, default ../shared/data).

    python -m benchmarks.prewarm_throughput --device cuda --encoder .gpu/model --data .gpu/data \\
        --out benchmarks/results/scale_gpu_prewarm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import load_nq, resolve_source

from .data import DataMissing, main_guard


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prewarm_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024, 4096],
                    help="prewarm batch sizes (texts encoded and stored at a time) to compare, side by side")
    ap.add_argument("--n", type=int, default=None, help="first N passages only (default: all)")
    args = ap.parse_args(argv)
    try:
        source = resolve_source(args.data)
    except FileNotFoundError as e:
        raise DataMissing(str(e)) from None
    texts = sorted({p for r in load_nq(None, source) for p in r.chunks})[:args.n]
    eng = SemToken(SemTokenConfig(encoder=args.encoder, device=args.device))
    device = eng.encoder.device
    eng.prewarm(texts[:512])  # warm-up: kernels, allocator
    # the same pre-warm without keeping each chunk's analysis in its entry (SemTokenConfig.prewarm_analyses),
    # at the engine's default step of 256 texts, beside it in every round
    bare = SemToken(eng.config.model_copy(update={"prewarm_analyses": False}), parts=eng.parts)
    runs: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    without: list[float] = []
    for _ in range(3):  # rounds: each batch size once per round, so they share the machine's state
        for b, engine, into in [(b, eng, runs[b]) for b in args.batch_sizes] + [(256, bare, without)]:
            engine.clear_caches()
            _sync(device)
            started = time.perf_counter()
            done = engine.prewarm(texts, batch_size=b)
            _sync(device)
            into.append(time.perf_counter() - started)
            if engine is eng:
                encoded = done
    forward = [eng.encoder.forward_seconds(texts) for _ in range(3)]
    per_batch = {str(b): len(texts) / statistics.median(r) for b, r in runs.items()}
    best = max(per_batch, key=per_batch.get)
    out = {"passages": len(texts), "encoded": encoded, "prewarm_seconds": runs[int(best)],
           "forward_seconds": forward, "prewarm_passages_per_s": per_batch[best], "best_batch_size": int(best),
           "prewarm_passages_per_s_by_batch_size": per_batch, "prewarm_seconds_by_batch_size": runs,
           "forward_passages_per_s": len(texts) / statistics.median(forward),
           "without_analyses_passages_per_s": len(texts) / statistics.median(without),
           "without_analyses_seconds": without,
           "encoder_batch_size": eng.encoder.batch_size,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
