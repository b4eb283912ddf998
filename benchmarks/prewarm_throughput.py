"""Pre-warm throughput in process (issue 12 (b) on a GPU box, where Redis and Ray are not installed):
``engine.prewarm`` over every NQ passage into the memory store, beside the raw encoder forward over the
same passages. Median of 3 runs after a warm-up. Needs the NQ file (``--data``, default ../shared/data).

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
from semtoken_rag.datasets import load_nq


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
    args = ap.parse_args(argv)
    texts = sorted({p for r in load_nq(None, args.data) for p in r.chunks})
    eng = SemToken(SemTokenConfig(encoder=args.encoder, device=args.device))
    device = eng.encoder.device
    eng.prewarm(texts[:512])  # warm-up: kernels, allocator
    runs = []
    for _ in range(3):
        eng.clear_caches()
        _sync(device)
        started = time.perf_counter()
        encoded = eng.prewarm(texts)
        _sync(device)
        runs.append(time.perf_counter() - started)
    forward = [eng.encoder.forward_seconds(texts) for _ in range(3)]
    out = {"passages": len(texts), "encoded": encoded, "prewarm_seconds": runs, "forward_seconds": forward,
           "prewarm_passages_per_s": len(texts) / statistics.median(runs),
           "forward_passages_per_s": len(texts) / statistics.median(forward),
           "batch_size": eng.encoder.batch_size,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
